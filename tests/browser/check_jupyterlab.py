"""The course as a student meets it: JupyterLab in headless Chromium (`make browser-check`).

Starts JupyterLab at the repository root as the README says, opens the first page, 02 and the
dataset explorer in Debian's `chromium`, and checks what the reader sees:

- every image in the markdown of 00 and 02 loads (`figures/`), and the first page's Hangul is
  drawn with a font that has Hangul (not boxes);
- "Run All Cells" on `01_dataset` runs without an error, the query explorer renders as an
  ipywidgets slider (not the text `IntSlider(...)`), and moving the slider redraws the figure.

Screenshots go to `build/browser-check/`. The notebooks on disk are never saved (autosave off,
checked by hash at the end).

Chromium is driven through the DevTools protocol over one websocket (`websocket-client`,
already a dependency of jupyter_server): no Selenium, no chromedriver whose version must match
the browser, and no driver download.
"""

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import websocket

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "build" / "browser-check"
CHROMIUM = "/usr/bin/chromium"
HEADER = "notebooks/00_header.ipynb"
EXPLORER = "notebooks/01_dataset.ipynb"  # the cheapest notebook with a query slider
NETWORK = "notebooks/02_network.ipynb"  # the other notebook with figures from figures/
SETTINGS = {  # JupyterLab user settings: never write the notebooks, no news pop-up
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                    "checkForUpdates": False},
}


def wait_for(check, timeout, what, interval=0.5):
    """Call `check()` until it returns something truthy; its value, or TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=5):
    """The body of `url`, or None when it does not answer (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except OSError:
        return None


def stop(proc, name):
    """SIGTERM to the process group started for `proc`, SIGKILL after 15 s."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        print(f"{name} did not stop in 15 s: SIGKILL", file=sys.stderr)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass


class Lab:
    """JupyterLab on 127.0.0.1 at the repository root, with its config in a temporary folder."""

    def __init__(self, tmp):
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.pop("MPLBACKEND", None)  # `make` sets Agg; a student's kernel uses the inline backend
        for var, sub in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                         ("JUPYTER_DATA_DIR", "data"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                         ("JUPYTERLAB_WORKSPACES_DIR", "workspaces")]:
            env[var] = str(tmp / sub)
        for plugin, values in SETTINGS.items():
            path = tmp / "settings" / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        self.log = tmp / "jupyterlab.log"
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
               "--ip=127.0.0.1", f"--port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", "--LabApp.expose_app_in_browser=True"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def api(self, path, method="GET"):
        request = urllib.request.Request(f"{self.base}/api/{path}?token={self.token}",
                                         method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def wait_ready(self, timeout=90):
        def answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited: {self.log.read_text()[-2000:]}")
            return http_get(f"{self.base}/api/status?token={self.token}")
        wait_for(answers, timeout, "JupyterLab answering on " + self.base)

    def url(self, notebook):
        return f"{self.base}/lab/tree/{notebook}?reset&token={self.token}"  # reset: no workspace

    def close(self):
        if self.proc.poll() is None:
            try:  # shut the kernels down first, so none outlives the server
                for kernel in self.api("kernels"):
                    self.api(f"kernels/{kernel['id']}", method="DELETE")
            except OSError as e:
                print(f"could not shut the kernels down: {e}", file=sys.stderr)
        stop(self.proc, "JupyterLab")


class Chromium:
    """Headless Chromium and one page of it, driven over the DevTools protocol."""

    def __init__(self, tmp, width=1400, height=1000):
        profile = tmp / "chromium"
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-dev-shm-usage", "--remote-debugging-port=0",
               f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]
        self.log = tmp / "chromium.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.next_id = 0
        try:
            self.ws = websocket.create_connection(self._page(profile), timeout=60,
                                                  suppress_origin=True)
            self.send("Emulation.setFocusEmulationEnabled", enabled=True)  # headless: no focus
        except BaseException:
            self.close()
            raise

    def _page(self, profile):
        """The DevTools websocket address of Chromium's page."""
        active = profile / "DevToolsActivePort"  # written once it listens: port, then path
        port = wait_for(lambda: active.exists() and active.read_text().split("\n")[0], 60,
                        "Chromium's DevTools port")
        pages = wait_for(lambda: [t for t in json.loads(
            http_get(f"http://127.0.0.1:{port}/json/list") or "[]") if t["type"] == "page"],
            30, "a Chromium page")
        return pages[0]["webSocketDebuggerUrl"]

    def send(self, method, **params):
        """One DevTools command; its result (events in between are skipped)."""
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
        raise TimeoutError(f"{method}: no answer from Chromium within 60 s")

    def js(self, expression):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url):
        self.send("Page.navigate", url=url)

    def key(self, key, keycode):
        """Press and release one key (e.g. "ArrowRight", 39) in the focused element."""
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key=key, code=key,
                      windowsVirtualKeyCode=keycode)

    def screenshot(self, path):
        import base64
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot")["data"]))
        return path

    def fonts_for(self, selector):
        """Fonts that drew the text of the first element matching `selector`: {family: glyphs}."""
        self.send("DOM.enable")
        self.send("CSS.enable")
        document = self.send("DOM.getDocument", depth=0)["root"]["nodeId"]
        node = self.send("DOM.querySelector", nodeId=document, selector=selector)["nodeId"]
        fonts = self.send("CSS.getPlatformFontsForNode", nodeId=node)["fonts"]
        return {f["familyName"]: f["glyphCount"] for f in fonts}

    def close(self):
        if hasattr(self, "ws"):
            self.ws.close()
        stop(self.proc, "Chromium")


# JavaScript run in the page; `jupyterapp` is JupyterLab (--LabApp.expose_app_in_browser).
# $PANEL: the panel of the notebook under test, $PATH (`shell.currentWidget` follows the focus).
PANEL = "[...window.jupyterapp.shell.widgets('main')].find(w => w.context?.path === $PATH)"
NOTEBOOK = """(() => { const w = window.jupyterapp && $PANEL;
  return !!(w && w.context.isReady && w.sessionContext.session?.kernel?.status === 'idle'); })()
"""
IMAGES = """(() => [...document.querySelectorAll('.jp-RenderedMarkdown img')].map(img => {
  img.scrollIntoView(); return {src: img.getAttribute('src'), complete: img.complete,
  width: img.naturalWidth}; }))()"""
RUN_STATE = """(() => { const w = $PANEL;
  const code = w.content.widgets.filter(c => c.model.type === 'code');
  return {kernel: w.sessionContext.session.kernel.status, cells: code.length,
    run: code.filter(c => c.model.executionCount !== null).length,
    errors: code.filter(c => c.model.outputs.toJSON().some(o => o.output_type === 'error'))
      .map(c => c.model.sharedModel.source.slice(0, 80))}; })()"""
EXPLORER_CELL = """(() => { const cell = $PANEL.content.widgets.find(c => c.model.type === 'code'
    && c.model.sharedModel.source.includes('explore_queries('));
  cell.node.scrollIntoView({block: 'end'}); return cell.node; })()"""
EXPLORER_STATE = """(() => { const cell = $CELL;
  const img = cell.querySelector('.jp-OutputArea-output img');
  const readout = cell.querySelector('.widget-readout');
  return {widget: !!cell.querySelector('.jupyter-widgets.widget-slider'),
    text: cell.querySelector('.jp-OutputArea').innerText, img: img && img.src,
    readout: readout && readout.innerText.trim()}; })()"""


def js_for(template, notebook):
    """A JavaScript template above, filled in for one notebook (path from the root)."""
    return (template.replace("$CELL", EXPLORER_CELL).replace("$PANEL", PANEL)
            .replace("$PATH", json.dumps(notebook)))


def markdown_images(notebook):
    """Number of images that a notebook's markdown cells reference (`![..](..)`, `<img`)."""
    cells = json.loads((ROOT / notebook).read_text())["cells"]
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return len(re.findall(r"!\[[^\]]*\]\(|<img\b", text))


def hangul_fonts():
    """Font families that fontconfig says have Hangul syllables (U+AC00), lower case."""
    out = subprocess.run(["fc-list", ":charset=ac00", "family"], capture_output=True,
                         text=True, timeout=30).stdout
    return {name.strip().lower() for line in out.splitlines() for name in line.split(",")}


def check_images(browser, lab, notebook):
    """Open `notebook`: every image its markdown references is drawn (loaded, not 404)."""
    browser.open(lab.url(notebook))
    wait_for(lambda: browser.js(js_for(NOTEBOOK, notebook)), 90, f"{notebook} open")
    expected = markdown_images(notebook)
    assert expected > 0, f"{notebook} has no image to check"

    def loaded():
        images = browser.js(IMAGES)
        return len(images) == expected and all(i["complete"] and i["width"] > 0 for i in images)
    try:
        wait_for(loaded, 30, f"images of {notebook}")
    except TimeoutError as e:
        raise AssertionError(f"broken images in {notebook}: {browser.js(IMAGES)}") from e
    print(f"{notebook}: {expected} image(s) loaded: "
          f"{[i['src'].split('?')[0] for i in browser.js(IMAGES)]}")


def check_header(browser, lab):
    """First page: every image loads; the Hangul title is drawn in a font with Hangul."""
    check_images(browser, lab, HEADER)

    title = browser.js("document.querySelector('.jp-RenderedMarkdown h1').innerText")
    hangul = len(re.findall("[\uac00-\ud7a3]", title))
    assert hangul > 0, f"no Hangul in the title {title!r}"
    fonts = browser.fonts_for(".jp-RenderedMarkdown h1")
    with_hangul = hangul_fonts()
    drawn = sum(n for family, n in fonts.items() if family.lower() in with_hangul)
    assert drawn >= hangul, (f"{hangul} Hangul syllables in {title!r}, but only {drawn} glyphs "
                             f"came from a font with Hangul: {fonts} (install fonts-nanum)")
    print(f"00_header: title {title!r} drawn with {fonts}")
    browser.js("document.querySelector('.jp-RenderedMarkdown img').scrollIntoView()")
    print("screenshot:", browser.screenshot(OUT / "00_header.png"))


def check_explorer(browser, lab):
    """01_dataset: Run All Cells, the explorer is a slider, and the slider redraws the figure."""
    browser.open(lab.url(EXPLORER))
    wait_for(lambda: browser.js(js_for(NOTEBOOK, EXPLORER)), 90, "01_dataset open")
    # Clear first, so that "run" below means "run in this browser", not "stored".
    browser.js(f"window.jupyterapp.shell.activateById({js_for(PANEL, EXPLORER)}.id)")
    browser.js("window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
    state = browser.js(js_for(RUN_STATE, EXPLORER))
    assert state["run"] == 0, state
    start = time.monotonic()
    browser.js("window.jupyterapp.commands.execute('notebook:run-all-cells'), true")

    def finished():
        state = browser.js(js_for(RUN_STATE, EXPLORER))
        assert not state["errors"], f"cells raised: {state['errors']}"
        return state if state["run"] == state["cells"] and state["kernel"] == "idle" else None
    state = wait_for(finished, 240, "Run All Cells on 01_dataset", interval=1)
    print(f"01_dataset: {state['cells']} code cells ran in {time.monotonic() - start:.0f} s")

    def explorer():
        return browser.js(js_for(EXPLORER_STATE, EXPLORER))
    before = wait_for(lambda: (s := explorer())["img"] and s, 30, "the explorer's figure")
    assert before["widget"], f"the explorer is not a widget: {before['text'][:200]!r}"
    assert "IntSlider(" not in before["text"], before["text"][:200]
    browser.js(js_for(EXPLORER_CELL, EXPLORER) + ".querySelector('.noUi-handle').focus()")
    browser.key("ArrowRight", 39)  # one step: the next query

    def redrawn():
        state, run = explorer(), browser.js(js_for(RUN_STATE, EXPLORER))
        assert not run["errors"], f"cells raised: {run['errors']}"
        return state["img"] != before["img"] and run["kernel"] == "idle" and state
    after = wait_for(redrawn, 60, "the explorer's figure redrawn after the slider moved")
    digest = [hashlib.sha256(s["img"].encode()).hexdigest()[:12] for s in (before, after)]
    print(f"01_dataset: slider {before['readout']} -> {after['readout']}, "
          f"figure {digest[0]} -> {digest[1]}")
    steps = (before["readout"], after["readout"])
    assert int(steps[1]) == int(steps[0]) + 1, steps
    time.sleep(1)  # let the new image paint before the screenshot
    print("screenshot:", browser.screenshot(OUT / "01_dataset_explorer.png"))


def main():
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} is missing: `make browser-check` installs Debian's chromium")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "failure.png").unlink(missing_ok=True)
    notebooks = {p: hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in (ROOT / "notebooks").glob("*.ipynb")}
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="browser-check-"))
    lab = browser = None
    try:
        lab = Lab(tmp)
        browser = Chromium(tmp)
        lab.wait_ready()
        print(f"JupyterLab at {lab.base}, root {ROOT}")
        check_header(browser, lab)
        check_images(browser, lab, NETWORK)
        check_explorer(browser, lab)
    except BaseException:
        try:
            print("screenshot at the failure:", browser.screenshot(OUT / "failure.png"))
        except Exception as e:  # keep the first error, not this one
            print(f"no screenshot at the failure: {e!r}", file=sys.stderr)
        for proc in (lab, browser):
            if proc is not None:
                print(f"--- end of {proc.log.name}:", *proc.log.read_text().splitlines()[-30:],
                      sep="\n", file=sys.stderr)
        raise
    finally:
        if browser is not None:
            browser.close()
        if lab is not None:
            lab.close()
        shutil.rmtree(tmp, ignore_errors=True)
    changed = [p.name for p, h in notebooks.items() if hashlib.sha256(p.read_bytes()).hexdigest()
               != h]
    assert not changed, f"the browser check changed notebooks on disk: {changed}"
    print(f"browser check passed in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
