"""The results page (report.html), opened in a real headless Chromium: rows, thumbnails, sorting, the word filter,
escaping, attention maps, a copied folder. ./setup.sh installs Debian's chromium and chromium-driver; without
them these tests skip, saying so."""
import json
import shutil
import tempfile
import urllib.parse
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import cap


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("no headless Chromium (chromium and chromedriver on the PATH): ./setup.sh installs Debian's "
                    "chromium and chromium-driver, or: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: run ./setup.sh")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="report-browser-")
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900",
                 f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(browser, path):
    browser.get(Path(path).resolve().as_uri())
    return browser


def visible_rows(browser):
    """(name, caption, scores) of the rows shown, in the order shown."""
    return browser.execute_script(
        "return [...document.querySelectorAll('#rows .row')].filter(r => !r.hidden && r.offsetParent)"
        ".map(r => [r.dataset.name, r.querySelector('.caption').textContent, JSON.parse(r.dataset.scores)])")


def thumbnails_load(browser):
    """Loads every thumbnail now (they are lazy) and says whether each one decoded into pixels."""
    browser.execute_script("document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; })")
    return browser.execute_async_script("""
        const done = arguments[arguments.length - 1], images = [...document.querySelectorAll('#rows img')];
        Promise.all(images.map(i => i.decode().then(() => true, () => false))).then(ok => done(ok));""")


def choose(browser, sort=None, word=None):
    browser.execute_script("""
        const [sort, word] = arguments;
        const set = (id, value, event) => { const e = document.getElementById(id); e.value = value;
                                            e.dispatchEvent(new Event(event)); };
        if (sort !== null) set('sort', sort, 'change');
        if (word !== null) set('filter', word, 'input');""",
        sort, word)


def test_the_demo_page_shows_every_test_image_sorted_worst_first(trained_demo, browser):
    captions = pd.read_csv(trained_demo / "test_captions.csv", keep_default_na=False)
    open_page(browser, trained_demo / "report.html")
    rows = visible_rows(browser)
    assert sorted(r[0] for r in rows) == sorted(captions["image"]) and len(rows) == 100
    assert all(thumbnails_load(browser))
    cider = [r[2]["CIDEr"] for r in rows]
    assert cider == sorted(cider) and cider[0] == captions["CIDEr"].min()  # worst first
    by_name = dict(zip(captions["image"], zip(captions["caption"], captions["right"])))
    assert all(by_name[name] == (caption, scores["right"]) for name, caption, scores in rows)
    assert browser.find_element("id", "count").text == "100 of 100 images"
    assert len(browser.find_elements("css selector", ".row .wrong")) == (~captions["right"]).sum()
    choose(browser, sort="CIDEr|desc")
    cider = [r[2]["CIDEr"] for r in visible_rows(browser)]
    assert cider == sorted(cider, reverse=True) and cider[0] == captions["CIDEr"].max()
    choose(browser, sort="name|asc")
    assert [r[0] for r in visible_rows(browser)] == sorted(captions["image"])


@pytest.mark.parametrize("word", ["red", "Blue", "tri"])
def test_the_word_filter_shows_only_the_captions_with_it(trained_demo, browser, word):
    captions = pd.read_csv(trained_demo / "test_captions.csv", keep_default_na=False)
    said = captions["caption"].str.lower().str.split().apply(lambda ws: any(w.startswith(word.lower()) for w in ws))
    open_page(browser, trained_demo / "report.html")
    choose(browser, word=word)
    shown = visible_rows(browser)
    assert 0 < len(shown) < 100 and sorted(r[0] for r in shown) == sorted(captions.loc[said, "image"])
    assert browser.find_element("id", "count").text == f"{len(shown)} of 100 images"
    choose(browser, word="")
    assert len(visible_rows(browser)) == 100


def test_an_attention_page_draws_each_words_map(trained_attention, browser):
    open_page(browser, trained_attention / "report.html")
    first = browser.find_element("css selector", "#rows .row")
    assert all(thumbnails_load(browser))
    words = first.find_element("css selector", ".caption").text.split()
    first.find_element("css selector", ".show-maps").click()
    maps = first.find_element("css selector", ".maps")
    assert maps.is_displayed() and len(maps.find_elements("css selector", "canvas")) == len(words)
    assert [f.text for f in maps.find_elements("css selector", "figcaption")] == words
    first.find_element("css selector", ".show-maps").click()
    assert not maps.is_displayed()


HOSTILE = '<script>window.hacked = 1</script> & "double" \'single\' <b>bold</b>'


def test_hostile_captions_and_file_names_show_as_text_and_the_page_works_copied(tmp_path, browser):
    images = tmp_path / "images"
    images.mkdir()
    names = ["a b.jpg", "ünïcode #1.jpg", "<img src=x onerror=window.hacked=2>.jpg", "100% & more.png"]
    for i, name in enumerate(names):
        Image.new("RGB", (60, 40), (40 * i, 100, 200)).save(images / name)
    rows = [{"path": images / n, "name": n, "caption": HOSTILE, "references": [HOSTILE, "</li></ul><i>x</i>"],
             "scores": {"CIDEr": i / 10}} for i, n in enumerate(names)]
    page = cap.write_report(tmp_path / "out", "report", HOSTILE, f"<p>{cap.html.escape(HOSTILE)}</p>", rows)
    for folder in (tmp_path / "out", shutil.copytree(tmp_path / "out", tmp_path / "elsewhere" / "copy")):
        open_page(browser, folder / page.name)
        assert browser.execute_script("return window.hacked === undefined && !document.querySelector('#rows b')")
        assert browser.title == HOSTILE
        assert browser.find_element("id", "count").text == "4 of 4 images"  # the page's script ran
        shown = visible_rows(browser)
        assert sorted(r[0] for r in shown) == sorted(names) and {r[1] for r in shown} == {HOSTILE}
        assert all(thumbnails_load(browser))  # relative links: the copy shows them too
        alts = [i.get_attribute("alt") for i in browser.find_elements("css selector", "#rows img")]
        assert sorted(alts) == sorted(names)
    # each name links to its own image, spaces, '#', '%' and unicode included (from the original folder)
    open_page(browser, page)
    links = [a.get_attribute("href") for a in browser.find_elements("css selector", "#rows a")]
    assert sorted(Path(urllib.parse.unquote(urllib.parse.urlparse(h).path)).name for h in links) == sorted(names)
    assert all(Path(urllib.parse.unquote(urllib.parse.urlparse(h).path)).is_file() for h in links)


def test_caption_writes_a_page_of_the_users_images(tmp_path, trained_demo, browser, capsys):
    photos = tmp_path / "my photos"
    photos.mkdir()
    for i, colour in enumerate([(220, 40, 40), (40, 80, 230)]):
        Image.new("RGB", (96, 96), colour).save(photos / f"photo {i}.jpg")
    out = tmp_path / "out"
    assert cap.main(["--caption", str(photos), f"--checkpoint={trained_demo / 'best.pt'}",
                     f"--output_dir={out}", "--num_workers=0"]) == 0
    printed = capsys.readouterr()
    assert f"results page: {out / 'report-captions.html'}" in printed.err
    assert "results page" not in printed.out  # stdout holds only the captions
    captions = dict(line.split("\t") for line in printed.out.splitlines())
    open_page(browser, out / "report-captions.html")
    shown = visible_rows(browser)
    assert {name: caption for name, caption, _ in shown} == captions and all(thumbnails_load(browser))
    assert all(scores == {} for _, _, scores in shown) and not browser.find_elements("css selector", ".row li")


def test_coco_image_ids_come_from_coco_file_names():
    assert cap.coco_image_id("val2014/COCO_val2014_000000391895.jpg") == 391895
    assert cap.coco_image_id("COCO_train2014_000000000009.jpg") == 9
    assert cap.coco_image_id("1000268201_693b08cb0e.jpg") == "1000268201_693b08cb0e.jpg"


def test_the_page_names_its_checkpoint_and_metrics(trained_demo):
    page = (trained_demo / "report.html").read_text()
    metrics = json.loads((trained_demo / "test_metrics.json").read_text())
    epoch = torch.load(trained_demo / "best.pt", weights_only=True)["epoch"]
    assert f"{trained_demo / 'best.pt'} (epoch {epoch}, lstm decoder)" in page
    assert f"<td>{100 * metrics['CIDEr']:.1f}</td>" in page and 'src="loss_graph.png"' in page
    assert "<td>demo_images</td>" in page  # a setting that differs from its constant (SMALL_DEMO's 1000)
