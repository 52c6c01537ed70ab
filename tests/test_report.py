"""The results page (report.html), opened in a real headless Chromium: rows, thumbnails, sorting, the
filters, escaping, attention maps, a copied folder, a phone's width; and its files written whole.
./setup.sh installs Debian's chromium and chromium-driver; without them the browser tests skip."""
import errno
import hashlib
import json
import os
import shutil
import tempfile
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import cap, demo_args, error_line

SCREENSHOTS = Path(os.environ.get("REPORT_SCREENSHOTS", tempfile.gettempdir()))  # where they go


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("no headless Chromium (chromium and chromedriver on the PATH): ./setup.sh "
                    "installs them, or: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: run ./setup.sh")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="report-browser-")
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--hide-scrollbars", f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=chromedriver))
    driver.set_window_size(1280, 900)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(browser, path, width=1280):
    """The page at a window width; 400 is a phone's (the viewport tag makes the page that wide)."""
    browser.set_window_size(width, 900)
    browser.get(Path(path).resolve().as_uri())
    return browser


def visible_rows(browser):
    """(name, caption, scores) of the rows shown, in the order shown."""
    return browser.execute_script(
        "return [...document.querySelectorAll('#rows .row')].filter(r => !r.hidden && r.offsetParent)"
        ".map(r => [r.entry.name, r.querySelector('.caption').textContent, r.entry.scores])")


def thumbnails_load(browser):
    """Loads every thumbnail now (they are lazy) and says whether each one decoded into pixels."""
    browser.execute_script("document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; })")
    return browser.execute_async_script("""
        const done = arguments[arguments.length - 1], images = [...document.querySelectorAll('img')];
        Promise.all(images.map(i => i.decode().then(() => true, () => false))).then(done);""")


def choose(browser, **values):
    """Sets the page's controls (sort, filter, verdict, shapes) as a user would."""
    browser.execute_script("""
        for (const [id, value] of Object.entries(arguments[0])) {
          const e = document.getElementById(id);
          e.value = value;
          e.dispatchEvent(new Event(id === 'filter' ? 'input' : 'change'));
        }""", values)


def test_the_demo_page_shows_every_test_image_sorted_worst_first(trained_demo, browser):
    captions = pd.read_csv(trained_demo / "test_captions.csv", keep_default_na=False)
    open_page(browser, trained_demo / "report.html")
    rows = visible_rows(browser)
    assert sorted(r[0] for r in rows) == sorted(captions["image"]) and len(rows) == 100
    assert all(thumbnails_load(browser))  # the thumbnails and the graphs
    cider = [r[2]["CIDEr"] for r in rows]
    assert cider == sorted(cider) and cider[0] == captions["CIDEr"].min()  # worst first, x100
    by_name = dict(zip(captions["image"], zip(captions["caption"], captions["right"])))
    assert all(by_name[name] == (caption, scores["right"]) for name, caption, scores in rows)
    assert browser.find_element("id", "count").text == "100 images"  # all of them
    assert len(browser.find_elements("css selector", ".row .wrong")) == (~captions["right"]).sum()
    choose(browser, sort="CIDEr|desc")
    cider = [r[2]["CIDEr"] for r in visible_rows(browser)]
    assert cider == sorted(cider, reverse=True) and cider[0] == captions["CIDEr"].max()
    choose(browser, sort="name|asc")
    assert [r[0] for r in visible_rows(browser)] == sorted(captions["image"])


@pytest.mark.parametrize("word", ["red", "Blue", "tri"])
def test_the_word_filter_shows_only_the_captions_with_it(trained_demo, browser, word):
    captions = pd.read_csv(trained_demo / "test_captions.csv", keep_default_na=False)
    said = captions["caption"].str.lower().str.split().apply(
        lambda words: any(w.startswith(word.lower()) for w in words))
    open_page(browser, trained_demo / "report.html")
    choose(browser, filter=word)
    shown = visible_rows(browser)
    assert 0 < len(shown) < 100 and sorted(r[0] for r in shown) == sorted(captions.loc[said, "image"])
    assert browser.find_element("id", "count").text == f"{len(shown)} of 100 images"
    choose(browser, filter="")
    assert len(visible_rows(browser)) == 100


def test_the_filters_show_right_or_wrong_and_one_or_two_shapes(trained_demo, demo_dirs, browser):
    captions = pd.read_csv(trained_demo / "test_captions.csv", keep_default_na=False)
    shapes = pd.read_csv(demo_dirs["data_dir"] / "shapes.csv").set_index("image")["shapes"]
    two = set(captions["image"][captions["image"].map(shapes).str.contains(";")])
    wrong = set(captions["image"][~captions["right"]])
    open_page(browser, trained_demo / "report.html")
    for verdict, shape, expected in [("false", "", wrong), ("true", "", set(captions["image"]) - wrong),
                                     ("", "2", two), ("", "1", set(captions["image"]) - two),
                                     ("false", "2", wrong & two)]:
        choose(browser, verdict=verdict, shapes=shape)
        assert {r[0] for r in visible_rows(browser)} == expected, (verdict, shape)
        assert browser.find_element("id", "count").text == f"{len(expected)} of 100 images"
    assert 0 < len(wrong & two) < len(two) < 100


@pytest.mark.parametrize("width", [1280, 400])
def test_the_page_fits_a_desktop_and_a_phone(trained_demo, browser, width):
    """No sideways scrolling at a phone's 400 px, text at a readable size, the graphs as large as
    they fit, each opening its full PNG. The screenshots go to $REPORT_SCREENSHOTS."""
    open_page(browser, trained_demo / "report.html", width)
    assert all(thumbnails_load(browser))
    page = browser.execute_script("""
        const size = e => parseFloat(getComputedStyle(e).fontSize);
        return {width: document.documentElement.clientWidth,
                scroll: document.documentElement.scrollWidth,
                caption: size(document.querySelector('.caption')),
                smallest: Math.min(...[...document.querySelectorAll('#rows *, .controls *')]
                                   .filter(e => e.offsetParent && e.textContent.trim()).map(size)),
                graphs: [...document.querySelectorAll('#graphs a')].map(
                    a => [a.getAttribute('href'), a.querySelector('img').getBoundingClientRect().width,
                          a.querySelector('img').naturalWidth]),
                heights: [...document.querySelectorAll('#graphs img')].map(i => i.getBoundingClientRect().height),
                // each caption's last word and its ' .' in one unbroken box: the dot never wraps alone
                tails: [...document.querySelectorAll('#rows .caption')].map(c => [c.textContent,
                    c.querySelector('.nowrap') && c.querySelector('.nowrap').getClientRects().length])};""")
    assert page["width"] == width and page["scroll"] <= width + 2, page  # no sideways scrolling
    assert page["caption"] >= 16 and page["smallest"] >= 13, page
    assert [href for href, _, _ in page["graphs"]] == ["loss_graph.png", "metrics_graph.png"]
    assert abs(page["heights"][0] - page["heights"][1]) < 2, page  # side by side, neither leaves a gap
    ended = [lines for caption, lines in page["tails"] if caption.endswith(" .")]
    assert len(ended) > 90 and ended == [1] * len(ended), page["tails"]
    for _, shown, natural in page["graphs"]:
        assert shown >= min(natural, width - 40) - 1, page  # at full size, or the width of the page
    browser.set_window_size(width, browser.execute_script("return document.body.scrollHeight") + 100)
    assert browser.get_screenshot_as_file(str(SCREENSHOTS / f"report-{width}px.png"))


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


HOSTILE = '<script>window.hacked = 1</script> & "double" \'single\' <b>bold</b> </script><!--'
HEADER = {"about": HOSTILE, "metrics": {"CIDEr": 12.5, HOSTILE: None}, "settings": {HOSTILE: HOSTILE}}


def hostile_page(folder, names=("a b.jpg", "ünïcode #1.jpg", "<img src=x onerror=window.hacked=2>.jpg",
                                "100% & more.png"), caption=HOSTILE, **outputs):
    """A page of a few images with hostile names and captions, written by write_report."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in names:  # a colour of its own: another name, another thumbnail
        Image.new("RGB", (60, 40), tuple(hashlib.sha256(name.encode()).digest()[:3])).save(images / name, "PNG")
    rows = [{"path": images / n, "name": n, "caption": caption, "scores": {"CIDEr": i / 10},
             "references": [caption, "</li></ul><i>x</i>"]} for i, n in enumerate(names)]
    outputs = {folder / "out" / name: text.encode() for name, text in outputs.items()}
    return cap.write_report(folder / "out", "report", HOSTILE, HEADER, rows, outputs), names


def test_hostile_captions_and_file_names_show_as_text_and_the_page_works_copied(tmp_path, browser):
    page, names = hostile_page(tmp_path)
    for folder in (page.parent, shutil.copytree(page.parent, tmp_path / "elsewhere" / "copy")):
        shutil.rmtree(tmp_path / "images", ignore_errors=True)  # the copy needs no data folder
        open_page(browser, folder / page.name)
        assert browser.execute_script("return window.hacked === undefined && !document.querySelector('b, i')")
        assert browser.title == HOSTILE and browser.find_element("tag name", "h1").text == HOSTILE
        assert browser.find_element("id", "count").text == "4 images"  # the page's script ran
        shown = visible_rows(browser)
        assert sorted(r[0] for r in shown) == sorted(names) and {r[1] for r in shown} == {HOSTILE}
        assert all(thumbnails_load(browser))  # relative links: the copy shows them too
        alts = [i.get_attribute("alt") for i in browser.find_elements("css selector", "#rows img")]
        assert sorted(alts) == sorted(names)
        # each picture links to the page's own copy of it, which travels with the page
        links = [a.get_attribute("href") for a in browser.find_elements("css selector", "#rows a")]
        files = [Path(urllib.parse.unquote(urllib.parse.urlparse(h).path)) for h in links]
        assert len(set(files)) == 4 and all(f.is_file() and f.parent == folder / "report" for f in files)
        assert "settings" in browser.find_element("tag name", "details").text


def test_bidi_controls_in_names_and_captions_are_shown_escaped(tmp_path, browser):
    """U+202E would show 'gpj.exe' as 'exe.jpg'; every bidi control is shown as its escape."""
    controls = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f"
    page, _ = hostile_page(tmp_path, names=["evil\u202egpj.exe"], caption=f"a{controls}b")
    assert not set(controls) & set(page.read_text(encoding="utf-8"))
    open_page(browser, page)
    [(name, caption, _)] = visible_rows(browser)
    assert name == "evil\\u202egpj.exe" and browser.find_element("css selector", ".name").text == name
    assert caption == "a" + "".join(f"\\u{ord(c):04x}" for c in controls) + "b"


def test_a_full_disk_leaves_the_old_page_and_files_whole(tmp_path, monkeypatch):
    """Each file is the old one whole or the new one whole: a write that fails part-way (ENOSPC at
    the first, a middle and the last file) is one line naming the file, and leaves the old ones."""
    page, _ = hostile_page(tmp_path, caption="old", **{"test_metrics.json": "old"})
    before = {p: p.read_bytes() for p in page.parent.rglob("*") if p.is_file()}
    real, written = Path.write_bytes, []

    def full_disk_at(n):
        def write_bytes(path, data):
            written.append(path)
            if len(written) == n:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, data)
        return write_bytes

    for n in (1, 3, 6):  # 4 thumbnails, the JSON and the page: the first, one between, the last
        written.clear()
        monkeypatch.setattr(Path, "write_bytes", full_disk_at(n))
        with pytest.raises(cap.UserError, match=r"^cannot write .*: No space left on device") as error:
            hostile_page(tmp_path, caption="new", **{"test_metrics.json": "new"})
        assert str(page.parent) in str(error.value)
        assert {p: p.read_bytes() for p in page.parent.rglob("*") if p.is_file()} == before
    monkeypatch.undo()
    assert len(written) == 6 and hostile_page(tmp_path, caption="new")[0] == page
    assert '"caption": "new"' in page.read_text() and len(list((page.parent / "report").iterdir())) == 4


def test_a_kill_while_the_files_are_renamed_leaves_every_thumbnail_of_the_page_shown(tmp_path,
                                                                                     monkeypatch):
    """Killed between any two renames, the page there (old or new) has all its thumbnails."""
    page, names = hostile_page(tmp_path)
    real, renamed = os.replace, []

    def killed_at(n):
        def replace(source, target):
            renamed.append(target)
            if len(renamed) == n:
                raise KeyboardInterrupt  # as a signal would stop it
            return real(source, target)
        return replace

    for n in range(1, 6):  # 4 thumbnails, then the page
        renamed.clear()
        monkeypatch.setattr(cap.os, "replace", killed_at(n))
        with pytest.raises(KeyboardInterrupt):
            hostile_page(tmp_path, names=[f"{n} {name}" for name in names])
        text = page.read_text(encoding="utf-8")
        thumbnails = json.loads(text.split('type="application/json">')[1].split("</script>")[0])
        assert all((page.parent / urllib.parse.unquote(row["thumbnail"])).is_file()
                   for row in thumbnails["rows"])
        assert not list(page.parent.glob("writing-*"))  # the temporary folder went too


def test_a_full_disk_during_evaluate_is_one_line(trained_demo, demo_dirs, random_weights, tmp_path,
                                                 monkeypatch, capsys):
    out = shutil.copytree(trained_demo, tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
    args = demo_args(demo_dirs, random_weights, out, "--evaluate", "--beam_size=1")
    assert cap.main(args) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    real = Path.write_bytes

    def full_at_the_fourth_file(path, data):  # the CSV and two COCO files are written, then
        if path.name == "3":  # test_metrics-best-beam1.json is not: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(Path, "write_bytes", full_at_the_fourth_file)
    assert cap.main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write {out / 'test_metrics-best-beam1.json'}: No space")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_caption_writes_a_page_of_the_users_images(tmp_path, trained_demo, browser, capsys):
    photos = tmp_path / "my photos"
    photos.mkdir()
    for i, colour in enumerate([(220, 40, 40), (40, 80, 230)]):
        Image.new("RGB", (96, 96), colour).save(photos / f"photo {i}.jpg")
    out = tmp_path / "run"  # a copy of the run: the page goes beside its checkpoint, with its graphs
    out.mkdir()
    for name in ("best.pt", "loss_graph.png", "metrics_graph.png"):
        shutil.copy(trained_demo / name, out)
    assert cap.main(["--caption", str(photos), f"--checkpoint={out / 'best.pt'}", "--num_workers=0"]) == 0
    printed = capsys.readouterr()
    assert f"results page: {out / 'report-captions.html'}" in printed.err
    assert "results page" not in printed.out  # stdout holds only the captions
    captions = dict(line.split("\t") for line in printed.out.splitlines())
    for width in (1280, 400):
        open_page(browser, out / "report-captions.html", width)
        shown = visible_rows(browser)
        assert {name: caption for name, caption, _ in shown} == captions and all(thumbnails_load(browser))
        assert all(scores == {} for _, _, scores in shown) and not browser.find_elements("css selector", ".row li")
        # the user's captions first, in the first screenful; the checkpoint's graphs after them, folded
        page = browser.execute_script("""
            const top = e => e.getBoundingClientRect().top, box = document.getElementById('graph-box');
            return {row: top(document.querySelector('#rows .row')), graphs: top(box), open: box.open,
                    note: document.getElementById('note').offsetParent !== null,
                    count: document.getElementById('count').textContent};""")
        assert page["row"] < 600 and page["row"] < page["graphs"] and not page["open"], page
        assert page["note"] and page["count"] == "2 images", page  # not '2 of 2 images'
        browser.set_window_size(width, browser.execute_script("return document.body.scrollHeight") + 100)
        assert browser.get_screenshot_as_file(str(SCREENSHOTS / f"report-captions-{width}px.png"))


def test_coco_files_use_coco_ids_or_the_place_in_sorted_order():
    refs = {"val2014/COCO_val2014_000000391895.jpg": ["a", "b"], "COCO_train2014_000000000009.jpg": ["c"]}
    results, truth = map(json.loads, cap.coco_files(refs, {name: "x" for name in refs}))
    assert [r["image_id"] for r in results] == [391895, 9]
    assert [(a["image_id"], a["id"], a["caption"]) for a in truth["annotations"]] == [
        (391895, 0, "a"), (391895, 1, "b"), (9, 2, "c")]
    flickr = {"b.jpg": ["b"], "a.jpg": ["a"], "COCO_val2014_000000000001.jpg": ["c"]}  # not all COCO's
    results, truth = map(json.loads, cap.coco_files(flickr, {name: "x" for name in flickr}))
    assert [r["image_id"] for r in results] == [2, 1, 0]
    assert truth["images"] == [{"id": 0, "file_name": "COCO_val2014_000000000001.jpg"},
                               {"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}]
    assert truth["type"] == "captions" and "sorted" in truth["info"]["image_ids"]


def test_the_page_names_its_checkpoint_encoder_and_metrics_without_absolute_paths(trained_demo):
    page = (trained_demo / "report.html").read_text()
    data = json.loads(page.split('type="application/json">')[1].split("</script>")[0])
    metrics = json.loads((trained_demo / "test_metrics.json").read_text())
    epoch = torch.load(trained_demo / "best.pt", weights_only=True)["epoch"]
    assert data["about"].startswith(f"checkpoint best.pt (epoch {epoch}, lstm decoder), beam 3; "
                                    f"encoder: ResNet50 weights ../weights0/resnet50-test.pth; ")
    assert metrics["scale"] == 100 and data["metrics"]["CIDEr"] == metrics["CIDEr"] > 100
    assert data["settings"]["demo_images"] == "1000"  # differs from its constant
    assert str(trained_demo.parent) not in page and "/tmp/" not in page  # paths from output_dir


def test_a_demo_checkpoint_says_its_encoder_was_random(tmp_path):
    cfg = cap.resolve_settings({"dataset": "demo", "output_dir": str(cap.ROOT / "resources/output/demo")})
    ckpt = {"encoder_weights": str(cap.DEMO_WEIGHTS), "path": cap.ROOT / "resources/output/demo/best.pt",
            "epoch": 3, "model_args": {"decoder": "lstm"},
            "config": {"dataset": "demo", "data_dir": str(cap.ROOT / "resources/input/demo")}}
    header = cap.report_header(cfg, ckpt)
    assert header["about"] == ("checkpoint best.pt (epoch 3, lstm decoder), beam 3; encoder: random ResNet50 "
                               "(pipeline check only; captions meaningless); trained on demo (../../input/demo)")


def test_the_graphs_mark_the_best_epoch_and_the_start_of_scst(tmp_path, monkeypatch):
    """best.pt's epoch, as is_best picks it (by best_metric, of equals the later; once SCST has
    begun, its epochs by CIDEr where best_metric is demo_accuracy or val_loss), and SCST's start."""
    import matplotlib.axes
    lines, real = [], matplotlib.axes.Axes.axvline
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline",
                        lambda ax, x, **kw: lines.append((x, kw["label"])) or real(ax, x, **kw))
    epochs = pd.DataFrame({"epoch": [1, 2, 3, 4], "phase": ["cross-entropy"] * 3 + ["self-critical"],
                           "train_loss": [3.0, 2, 2.1, -0.1], "val_loss": [2.5, 2.0, 2.1, 2.2],
                           "BLEU-4": [0.1, 0.3, 0.2, 0.3], "METEOR": [None] * 4,
                           "demo_accuracy": [0.1, 0.5, 0.4, 0.3], "CIDEr": [0.3, 0.6, 0.5, 0.4]})
    batches = pd.DataFrame({"epoch": [1, 2, 3, 4], "step": [1, 2, 3, 4], "phase": epochs["phase"],
                            "loss": [4.0, 3, 2, -0.1], "reward": [None, None, None, 0.5],
                            "greedy_cider": [None, None, None, 0.4]})
    for scst, metric, best in [(True, "CIDEr", 2), (True, "BLEU-4", 4), (True, "val_loss", 4),
                               (True, "demo_accuracy", 4), (False, "val_loss", 2),
                               (False, "demo_accuracy", 2), (False, "BLEU-4", 2)]:
        rows = epochs[:4 if scst else 3].to_dict("records")
        batches[:len(rows)].to_csv(tmp_path / "loss_per_batch.csv", index=False)
        cfg = SimpleNamespace(best_metric=metric, num_epochs=3)
        progress = cap.Progress()
        for row in rows:  # as end_epoch keeps best.pt
            progress.epoch += 1
            cap.is_best(progress, row, cfg)
        assert progress.best_epoch == best, (scst, metric)
        lines.clear()
        progress.history = rows
        cap.write_history(tmp_path, progress)
        label = "best CIDEr" if scst and metric in ("val_loss", "demo_accuracy") else f"best {metric}"
        assert set(lines) == {(best, label), *[(3.5, "SCST begins")] * scst}, (scst, metric)
        assert len(lines) == 4 * (1 + scst)  # on loss per epoch and the three panels of metrics_graph.png
        assert pd.read_csv(tmp_path / "loss_per_epoch.csv")["epoch"].tolist() == list(range(1, len(rows) + 1))
    for name in ("loss_graph.png", "metrics_graph.png"):
        assert Image.open(tmp_path / name).size[0] >= 500


def test_each_panel_has_at_most_four_coloured_lines_and_the_best_marker_a_colour_of_its_own(tmp_path, monkeypatch):
    """The demo's validation once drew 9 lines in one panel, its 'best' marker the green of BLEU-4."""
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure
    epochs = pd.DataFrame({"epoch": [1, 2, 3], "phase": ["cross-entropy"] * 3, "train_loss": [3.0, 2, 1],
                           "val_loss": [2.5, 2.0, 2.1], "val_token_accuracy": [50, 60, 70],
                           **{name: [0.1, 0.3, 0.2] for name in ["BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
                                                                 "demo_accuracy", "demo_colour_shape_accuracy",
                                                                 "demo_two_shape_accuracy"]}})
    pd.DataFrame({"epoch": [1, 2, 3], "step": [1, 2, 3], "phase": epochs["phase"], "loss": [4.0, 3, 2],
                  "reward": [None] * 3, "greedy_cider": [None] * 3}).to_csv(tmp_path / "loss_per_batch.csv",
                                                                           index=False)
    figures, real = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda figure, *a, **kw: figures.append(figure) or real(figure, *a, **kw))
    progress = cap.Progress(epoch=3, best_epoch=2, best_metric="demo_accuracy", history=epochs.to_dict("records"))
    cap.write_history(tmp_path, progress)
    heights = {figure.get_size_inches()[1] for figure in figures}
    assert len(figures) == 2 and len(heights) == 1  # side by side on the page: no gap under either
    panels = [ax for figure in figures for ax in figure.axes]
    drawn = {line.get_label() for ax in panels for line in ax.get_lines()}
    assert {"val_token_accuracy", "BLEU-4", "demo_two_shape_accuracy", "CIDEr", "loss"} <= drawn
    for ax in panels:
        best = [to_hex(line.get_color()) for line in ax.get_lines() if line.get_label().startswith("best")]
        data = [to_hex(line.get_color()) for line in ax.get_lines() if not line.get_label().startswith("best")]
        assert len(data) <= 4 and not set(best) & set(data), ax.get_title()
