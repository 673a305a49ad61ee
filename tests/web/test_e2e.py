"""End to end in real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium with an explicit driver path, so nothing is downloaded): upload a phantom, scroll to
the tumour, draw a box with the mouse, wait for the overlay, add a point, undo, brush, export;
SSA review and its undo; zoom, pan and window/level of the viewer.
Screenshots of every step go to ``artifacts/web/`` in the repository (git-ignored)."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.web.conftest import ARTIFACTS

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

selenium = pytest.importorskip("selenium", reason="selenium is not installed (dev extra)")
if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(
        "end-to-end tests need Debian's chromium and chromium-driver (/usr/bin/chromium, "
        "/usr/bin/chromedriver): apt-get install chromium chromium-driver (./dev does it as root)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CANVAS = 560  # the page's canvas size (index.html)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model, data_dir):
    """The app on a real port (uvicorn in a thread); the encoder is slowed a little so the
    progress bar is on screen long enough to be photographed."""
    import uvicorn

    from slidesam.web.app import create_app
    from slidesam.web.state import ServerConfig

    encode = model.encode

    def slow_encode(x):
        time.sleep(0.15)
        return encode(x)

    model.encode = slow_encode
    app = create_app(ServerConfig(data_dir=data_dir), model=model, allowed_hosts=["127.0.0.1"])
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    end = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < end, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(timeout=10)
    model.encode = encode


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="slidesam-chromium-")
    downloads = tempfile.mkdtemp(prefix="slidesam-downloads-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
        "--force-device-scale-factor=1",
    ):
        opts.add_argument(flag)
    opts.add_experimental_option(
        "prefs", {"download.default_directory": downloads, "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(30)
    driver.downloads = Path(downloads)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)
    shutil.rmtree(downloads, ignore_errors=True)


def _shot(driver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def _js(driver, code: str):
    return driver.execute_script(code)


def _wait(driver, cond, timeout: float = 30, what: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: cond(d), message=what
    )


def _version(driver) -> int:
    return int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-version"))


def _idle_after(driver, version: int, what: str) -> None:
    _wait(
        driver,
        lambda d: (
            _version(d) > version
            and d.find_element(By.TAG_NAME, "body").get_attribute("data-busy") == "0"
        ),
        what=what,
    )


def _offset(x: float, y: float) -> tuple[int, int]:
    """Selenium offset from the canvas centre of slice pixel (x, y) of a 64 x 64 slice."""
    scale = CANVAS / 64
    return round((x + 0.5) * scale - CANVAS / 2), round((y + 0.5) * scale - CANVAS / 2)


def _export(base: str, sid: str) -> sitk.Image:
    with urllib.request.urlopen(f"{base}/api/sessions/{sid}/export") as r:
        data = r.read()
    with tempfile.NamedTemporaryFile(suffix=".nii.gz") as f:
        f.write(data)
        f.flush()
        return sitk.ReadImage(f.name)


def test_annotate_in_the_browser(server, browser, data_dir, case):
    base, _app = server
    d = browser
    for old in ARTIFACTS.glob("*.png") if ARTIFACTS.is_dir() else ():
        old.unlink()
    d.get(base + "/")
    _wait(d, lambda d: d.find_element(By.ID, "model-name").text.startswith("model:"))
    _shot(d, "01_start")

    # 1. load a phantom volume by uploading it through the file input
    image_path = data_dir / "case" / "arterial.nii.gz"
    d.find_element(By.ID, "upload").send_keys(str(image_path))
    _wait(d, lambda d: _version(d) == 0, what="the volume did not open")
    _wait(d, lambda d: "slice" in d.find_element(By.ID, "slice-label").text)
    start = _js(d, "return window.slidesam.slice")
    assert start == 12  # the middle of 24 slices
    assert d.find_element(By.ID, "slice-label").text == "slice 12 / 23"
    _shot(d, "02_loaded")

    # 2. scroll to the tumour's largest slice with the mouse wheel
    canvas = d.find_element(By.ID, "view")
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

    origin = ScrollOrigin.from_element(canvas)
    for _ in range(abs(case.slice - start)):
        ActionChains(d).scroll_from_origin(origin, 0, 100 if case.slice > start else -100).perform()
    _wait(d, lambda d: _js(d, "return window.slidesam.slice") == case.slice, 10, "wheel scroll")
    assert d.find_element(By.ID, "slice-label").text == f"slice {case.slice} / 23"

    # 3. draw a box with the mouse: progress bar while Slide-SAM runs, then the overlay
    x0, y0, x1, y1 = case.box
    v = _version(d)
    ActionChains(d).move_to_element_with_offset(
        canvas, *_offset(x0, y0)
    ).click_and_hold().move_by_offset(10, 10).move_to_element_with_offset(
        canvas, *_offset(x1, y1)
    ).release().perform()
    _wait(
        d,
        lambda d: "idle" not in d.find_element(By.ID, "progress").get_attribute("class"),
        10,
        "no progress bar",
    )
    assert d.find_element(By.ID, "progress").value_of_css_property("visibility") == "visible"
    _wait(d, lambda d: "Slide-SAM" in d.find_element(By.ID, "progress-text").text, 10)
    _shot(d, "03_progress")
    _idle_after(d, v, "the box's segmentation did not finish")
    assert d.find_element(By.ID, "progress").value_of_css_property("visibility") == "hidden"
    state = _js(d, "return window.slidesam.session")
    sid = state["id"]
    assert state["prompts"][0]["box"] == [float(c) for c in case.box]  # the mouse drew the box
    slices = state["label_slices"]["1"]
    assert case.slice in slices
    assert len(slices) >= 5
    # the overlay is drawn: the box centre is tinted with label 1's red
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    _wait(d, lambda d: _js(d, f"return window.slidesam.masks.has({case.slice})"), 10)
    px = _js(
        d,
        "const c=document.getElementById('view').getContext('2d');"
        f"return Array.from(c.getImageData({(cx + 0.5) * CANVAS / 64}, "
        f"{(cy + 0.5) * CANVAS / 64}, 1, 1).data)",
    )
    assert px[0] > px[1] + 40, px
    after_box = sitk.GetArrayFromImage(_export(base, sid))
    assert after_box[case.slice, y0 : y1 + 1, x0 : x1 + 1].sum() >= 50
    _shot(d, "04_box_overlay")

    # 4. add a background point on the mask's edge slice
    edge = slices[-1]
    for _ in range(edge - case.slice):
        d.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_DOWN)
    _wait(d, lambda d: _js(d, "return window.slidesam.slice") == edge, 10, "arrow keys")
    ys, xs = np.nonzero(after_box[edge] == 1)
    d.find_element(By.CSS_SELECTOR, '[data-tool="point-"]').click()
    v = _version(d)
    ActionChains(d).move_to_element_with_offset(canvas, *_offset(xs[0], ys[0])).click().perform()
    _idle_after(d, v, "the point's segmentation did not finish")
    state = _js(d, "return window.slidesam.session")
    assert len(state["prompts"]) == 2
    assert next(p for p in state["prompts"] if p["slice"] == edge)["point_labels"] == [0]
    after_point = sitk.GetArrayFromImage(_export(base, sid))
    assert not np.array_equal(after_point, after_box)
    _shot(d, "05_point")

    # 5. undo: the mask is exactly the one after the box
    v = _version(d)
    d.find_element(By.ID, "undo").click()
    _idle_after(d, v, "undo")
    assert np.array_equal(sitk.GetArrayFromImage(_export(base, sid)), after_box)
    assert len(_js(d, "return window.slidesam.session.prompts")) == 1
    assert d.find_element(By.ID, "redo").is_enabled()
    _shot(d, "06_undo")

    # 6. brush a stroke with label 2 on the tumour's slice
    for _ in range(edge - case.slice):
        d.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_UP)
    _wait(d, lambda d: _js(d, "return window.slidesam.slice") == case.slice, 10)
    d.find_element(By.CSS_SELECTOR, '[data-tool="brush"]').click()
    d.find_element(By.CSS_SELECTOR, '#label option[value="2"]').click()
    v = _version(d)
    ActionChains(d).move_to_element_with_offset(
        canvas, *_offset(8, 55)
    ).click_and_hold().move_to_element_with_offset(canvas, *_offset(20, 55)).release().perform()
    _idle_after(d, v, "brush")
    brushed = sitk.GetArrayFromImage(_export(base, sid))
    assert (brushed == 2).sum() >= 20
    assert (brushed[case.slice, 55, 9:20] == 2).all()
    assert set(np.flatnonzero((brushed == 2).any(axis=(1, 2)))) == {case.slice}
    assert d.find_element(By.ID, "hand-edits").text == (
        f"hand edits: {(brushed == 2).sum()} px painted, 0 px erased (kept over new prompts)"
    )
    _shot(d, "07_brush")

    # 7. export: the browser downloads the NIfTI with the input's geometry
    d.find_element(By.ID, "export").click()
    target = d.downloads / "arterial_mask.nii.gz"
    _wait(d, lambda d: target.is_file() and target.stat().st_size > 0, 20, "no download")
    time.sleep(0.2)
    got = sitk.ReadImage(str(target))
    ref = sitk.ReadImage(str(image_path))
    assert got.GetSize() == ref.GetSize()
    assert got.GetOrigin() == ref.GetOrigin()
    assert got.GetSpacing() == ref.GetSpacing()
    assert got.GetDirection() == ref.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(got), brushed)
    assert "exported arterial_mask.nii.gz" in d.find_element(By.ID, "status").text
    _shot(d, "08_exported")
    assert not d.find_element(By.ID, "error").is_displayed()


def test_ssa_review_in_the_browser(server, browser):
    base, _app = server
    d = browser
    d.get(base + "/")
    _wait(d, lambda d: d.find_element(By.ID, "ssa-arterial").get_attribute("value"))
    assert d.find_element(By.ID, "ssa-plain").get_attribute("value") == "case/plain.nii.gz"
    assert d.find_element(By.ID, "ssa-arterial").get_attribute("value") == "case/arterial.nii.gz"
    d.find_element(By.ID, "run-ssa").click()
    _wait(d, lambda d: _js(d, "const s = window.slidesam.session; return s && s.review.length > 0"))
    _wait(d, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-busy") == "0")
    review = _js(d, "return window.slidesam.session.review")
    rows = d.find_elements(By.CSS_SELECTOR, "#review tbody tr")
    assert len(rows) == len(review)
    rejected = [r for r in review if not r["accepted"]]
    assert len(d.find_elements(By.CSS_SELECTOR, "#review tr.rejected")) == len(rejected)
    assert not _js(d, "return document.getElementById('propagate').checked")  # per-slice fixes
    _shot(d, "09_ssa_review")
    if rejected:  # accept the first rejected slice from the table
        row = d.find_element(By.CSS_SELECTOR, "#review tr.rejected")
        v = _version(d)
        row.find_element(By.TAG_NAME, "button").click()
        _idle_after(d, v, "accept")
        assert len(d.find_elements(By.CSS_SELECTOR, "#review tr.rejected")) == len(rejected) - 1
        assert len(d.find_elements(By.CSS_SELECTOR, "#review tr.accepted-by-user")) == 1
        _shot(d, "10_ssa_accepted")
    # undo back to before the SSA run: its mask and its confidence table go away
    while d.find_element(By.ID, "undo").is_enabled():
        v = _version(d)
        d.find_element(By.ID, "undo").click()
        _idle_after(d, v, "undo")
    assert not d.find_element(By.ID, "review-section").is_displayed()
    assert _js(d, "return window.slidesam.session.review") == []
    assert _js(d, "return window.slidesam.session.label_slices") == {}
    assert d.find_element(By.ID, "history-text").text == "redo: SSA (plain phase)"
    _shot(d, "11_ssa_undone")


def _pixel(driver, x: float, y: float) -> list[int]:
    """RGBA of the canvas pixel at (x, y) canvas pixels."""
    return _js(
        driver,
        "return Array.from(document.getElementById('view').getContext('2d')"
        f".getImageData({x}, {y}, 1, 1).data)",
    )


def _grey(value: float, window: float, level: float) -> float:
    """The page's grey value of an image value (app.js ``draw``)."""
    return min(255.0, max(0.0, (value - (level - window / 2)) / window * 255))


def test_viewer_zoom_pan_and_window_level(server, browser, case):
    base, _app = server
    d = browser
    d.get(base + "/")
    _wait(d, lambda d: d.find_element(By.ID, "files").get_attribute("value"))
    d.find_element(By.CSS_SELECTOR, '#files option[value="case/arterial.nii.gz"]').click()
    d.find_element(By.ID, "open-file").click()
    _wait(
        d,
        lambda d: _js(
            d,
            "const u = window.slidesam; return u.session && u.session.name === "
            "'arterial.nii.gz' && !u.session.review.length && u.images.has(u.slice)",
        ),
        what="the volume did not open",
    )
    image = case.images["arterial"].array[_js(d, "return window.slidesam.slice")]
    canvas = d.find_element(By.ID, "view")
    fit = CANVAS / 64
    assert _js(d, "return window.slidesam.view()") == {
        "w": 64,
        "h": 64,
        "scale": fit,
        "ox": 0,
        "oy": 0,
    }
    centre = _pixel(d, 283, 283)  # slice pixel (32, 32) at every zoom about the centre
    assert abs(centre[0] - _grey(float(image[32, 32]), 400, 40)) <= 1  # abdomen window (CT)
    # a tissue pixel near the top-left corner: grey at fit (the slice fills the canvas)
    y, x = next((y, x) for y in range(4) for x in range(4) if _grey(image[y, x], 400, 40) > 30)
    corner = ((x + 0.5) * fit, (y + 0.5) * fit)
    assert abs(_pixel(d, *corner)[0] - _grey(image[y, x], 400, 40)) <= 1

    # zoom in with the button and Ctrl+wheel: the slice grows about the canvas centre
    d.find_element(By.ID, "zoom-in").click()
    view = _js(d, "return window.slidesam.view()")
    assert view["scale"] == pytest.approx(fit * 1.25)
    assert view["ox"] == pytest.approx((CANVAS - 64 * fit * 1.25) / 2)
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

    ActionChains(d).key_down(Keys.CONTROL).scroll_from_origin(
        ScrollOrigin.from_element(canvas), 0, -100
    ).key_up(Keys.CONTROL).perform()
    _wait(d, lambda d: _js(d, "return window.slidesam.zoom") > 1.25, 5, "Ctrl+wheel zoom")
    assert _js(d, "return window.slidesam.zoom") == pytest.approx(1.5)
    assert _pixel(d, 283, 283) == centre
    # the corner point now shows the slice pixel the exposed transform says, further in
    view = _js(d, "return window.slidesam.view()")
    assert view["ox"] == pytest.approx((CANVAS - 64 * fit * 1.5) / 2)
    sx = int((corner[0] - view["ox"]) // view["scale"])
    sy = int((corner[1] - view["oy"]) // view["scale"])
    assert sx >= x + 9  # (x + 0.5) * 2 / 3 + 10.7 columns in at zoom 1.5
    assert sy >= y + 9
    assert abs(_pixel(d, *corner)[0] - _grey(image[sy, sx], 400, 40)) <= 1
    _shot(d, "12_zoom_in")

    # zoom out below fit: black margins around a smaller slice
    for _ in range(3):
        d.find_element(By.ID, "zoom-out").click()
    assert _js(d, "return window.slidesam.zoom") == pytest.approx(1.5 / 1.25**3)
    assert _pixel(d, *corner) == [0, 0, 0, 255]  # now in the margin
    assert _pixel(d, 283, 283) == centre
    _shot(d, "13_zoom_out")

    # pan with the Pan tool: the picture moves by exactly the drag
    d.find_element(By.ID, "zoom-fit").click()
    assert _js(d, "return [window.slidesam.zoom, window.slidesam.pan]") == [1, [0, 0]]
    d.find_element(By.CSS_SELECTOR, '[data-tool="pan"]').click()
    before = [_pixel(d, x, y) for x, y in ((150, 200), (300, 300), (420, 380))]
    assert _pixel(d, 40, 20) != [0, 0, 0, 255]  # slice pixel (4, 2): tissue
    ActionChains(d).move_to_element(canvas).click_and_hold().move_by_offset(40, 20).move_by_offset(
        40, 20
    ).release().perform()
    assert _js(d, "return window.slidesam.pan") == [80, 40]
    assert _js(d, "return window.slidesam.view()")["ox"] == 80
    after = [_pixel(d, x + 80, y + 40) for x, y in ((150, 200), (300, 300), (420, 380))]
    assert after == before
    assert _pixel(d, 40, 20) == [0, 0, 0, 255]  # uncovered on the top left
    _shot(d, "14_pan")
    d.find_element(By.ID, "zoom-fit").click()

    # window/level: presets, then a right-drag (4 W and 2 L per pixel)
    wl_text = lambda: d.find_element(By.ID, "wl-value").text  # noqa: E731
    v = float(image[32, 32])
    for preset, (w, lev), shot in (
        ("abdomen", (400, 40), "15_preset_abdomen"),
        ("bone", (1800, 400), "16_preset_bone"),
        ("lung", (1500, -600), "17_preset_lung"),
    ):
        d.find_element(By.CSS_SELECTOR, f'[data-preset="{preset}"]').click()
        _wait(d, lambda d, w=w, lev=lev: wl_text() == f"W {w} L {lev}", 5, preset)
        assert _js(d, "return window.slidesam.wl") == [w, lev]
        grey = _pixel(d, 283, 283)
        assert grey[0] == grey[1] == grey[2]
        assert abs(grey[0] - _grey(v, w, lev)) <= 1, (preset, v, grey)
        _shot(d, shot)
    d.find_element(By.CSS_SELECTOR, '[data-preset="abdomen"]').click()
    _wait(d, lambda d: wl_text() == "W 400 L 40", 5)
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.mouse_button import MouseButton

    drag = ActionBuilder(d)
    drag.pointer_action.move_to(canvas).pointer_down(MouseButton.RIGHT).move_by(25, 10).move_by(
        25, 10
    ).pointer_up(MouseButton.RIGHT)
    drag.perform()
    assert wl_text() == "W 600 L 80"
    assert _js(d, "return window.slidesam.wl") == [600, 80]
    grey = _pixel(d, 283, 283)
    assert abs(grey[0] - _grey(v, 600, 80)) <= 1
    assert not d.find_element(By.ID, "error").is_displayed()
    _shot(d, "18_window_level_drag")
