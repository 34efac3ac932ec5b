"""Screenshot every page of the built site as a reader's browser shows it, offline.

    python docs/screenshots.py                      # PNGs in site-screenshots/
    python docs/screenshots.py --out /tmp/shots --pages stages/11-server
    python docs/screenshots.py --pages stages/15-lora --top 6000    # the part 6,000 px down
    python docs/screenshots.py --pages stages/15-lora --height 20000  # a whole long page

Builds the site with ``mkdocs build --strict`` into a temporary folder, serves
it on 127.0.0.1, and has headless Chromium (Debian's ``chromium`` package:
``apt-get install chromium``) take one tall screenshot per page, with a few
seconds of page time so mermaid diagrams and charts render. Nothing is
fetched from the network: the browser runs with background networking off,
and the site carries its own mermaid.js.
"""

import argparse
import functools
import http.server
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=8000",  # page time for scripts (mermaid) before the shot
]


def build_site(folder: Path) -> None:
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(folder)],
                   cwd=ROOT, check=True)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # one line per file fetched would bury the output
        pass


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def screenshot(browser: str, url: str, out: Path, width: int, height: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={out}", url], check=True, capture_output=True, timeout=120)


def crop(png: Path, top: int) -> None:
    """Keep ``png``'s rows from ``top`` down (matplotlib reads and writes PNG; no imaging library needed)."""
    import matplotlib.image

    matplotlib.image.imsave(png, matplotlib.image.imread(png)[top:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python docs/screenshots.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "site-screenshots")
    parser.add_argument("--pages", nargs="*", help="page paths without .md (default: every page)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=3000, help="window height: the shot's; raise it for a whole page")
    parser.add_argument("--top", type=int, default=0, help="start the shot this many pixels down the page")
    args = parser.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("error: no chromium on PATH; install Debian's package: apt-get install chromium", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as site:
        build_site(Path(site))
        pages = args.pages or sorted(
            str(p.parent.relative_to(site)) for p in Path(site).rglob("index.html") if "assets" not in p.parts
        )
        server, base = serve(Path(site))
        try:
            for page in pages:
                page = page.strip("/") if page not in (".", "") else ""
                out = args.out / f"{page.replace('/', '__') or 'index'}{f'@{args.top}' if args.top else ''}.png"
                url = f"{base}/{page}/" if page else f"{base}/"
                screenshot(browser, url, out, args.width, args.top + args.height)
                if args.top:  # headless Chromium shoots from the top: keep the rows asked for
                    crop(out, args.top)
                print(out)
        finally:
            server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
