"""The web console in a real browser: Playwright driving Debian's Chromium.

Where no Chromium can be installed these tests skip, saying so; with METALAKE_REQUIRE_BROWSER=1
(CI) they fail instead. `make test` installs Chromium where it can (apt-get as root). Each test
leaves a screenshot under the temporary directory (printed), for a reviewer to look at.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import (
    Browser,
    Dialog,
    Page,
    Request,
    Response,
    Route,
    expect,
    sync_playwright,
)

from metalake import Client
from metalake.server.auth import Role
from metalake.server.config import Settings
from tests import imagesamples
from tests.conftest import ServerHandle, serving
from tests.test_thumbnails import on_server

CHROMIUM = os.environ.get("METALAKE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a small /dev/shm
]
SCREENSHOTS = Path(tempfile.gettempdir()) / "metalake-console-screenshots"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        reason = f"no Chromium at {CHROMIUM}: `make test` installs Debian's (apt-get, as root)"
        if os.environ.get("METALAKE_REQUIRE_BROWSER"):
            pytest.fail(f"the browser tests are required here, but {reason}")
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Console:
    handle: ServerHandle
    url: str
    client: Client
    page: Page
    dialogs: list[str]

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path


def _console(browser: Browser, settings: Settings, token: str = "") -> Iterator[Console]:
    with serving(settings) as handle:
        assert handle.running.http is not None
        url = f"http://127.0.0.1:{handle.running.http.port}/"
        context = browser.new_context(
            viewport={"width": 1280, "height": 900}, accept_downloads=True
        )
        page = context.new_page()
        page.set_default_timeout(20_000)
        dialogs: list[str] = []

        def on_dialog(dialog: Dialog) -> None:
            dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        with Client(handle.target, token=token or None) as client:
            try:
                yield Console(handle, url, client, page, dialogs)
            finally:
                context.close()
        assert errors == [], f"the console raised: {errors}"


@pytest.fixture
def console(browser: Browser, tmp_path: Path) -> Iterator[Console]:
    settings = Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0", http_listen="127.0.0.1:0")
    yield from _console(browser, settings)


def photo(tmp_path: Path, name: str, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path = tmp_path / name
    image = imagesamples.landscape(640, 480)
    image.paste(colour, (0, 0, 320, 480))
    path.write_bytes(imagesamples.encoded(image, "JPEG"))
    return path


def open_grid(console: Console) -> None:
    console.page.goto(console.url)
    console.page.wait_for_selector("body[data-live=on]")


def test_an_upload_appears_without_reloading(console: Console, tmp_path: Path) -> None:
    open_grid(console)
    assert console.page.locator("#grid .card").count() == 0
    datalake = console.client.get_datalake()
    data = datalake.upload_data(photo(tmp_path, "arrived.jpg"), metadata={"manufacturer": "Canon"})
    card = console.page.locator(f'#grid .card[data-id="{data.id}"]')
    card.wait_for()
    assert card.locator(".name").text_content() == "arrived.jpg"
    card.locator("img").evaluate("img => img.decode()")  # the preview arrived and decodes
    assert card.locator("img").evaluate("img => img.naturalWidth") == 256
    expect(console.page.locator("#facet-manufacturer")).to_have_text("Canon")
    console.screenshot("live-upload")


def test_filter_and_a_bad_filter_shown_where_it_is_wrong(console: Console, tmp_path: Path) -> None:
    datalake = console.client.get_datalake()
    canon = datalake.upload_data(photo(tmp_path, "c.jpg"), metadata={"manufacturer": "Canon"})
    nikon = datalake.upload_data(photo(tmp_path, "n.jpg"), metadata={"manufacturer": "Nikon"})
    open_grid(console)
    page = console.page
    page.locator(f'.card[data-id="{nikon.id}"]').wait_for()
    assert page.locator("#grid .card").count() == 2

    page.fill("#filter", 'manufacturer = "Canon"')
    page.press("#filter", "Enter")
    expect(page.locator("#grid .card")).to_have_count(1)
    assert page.locator("#grid .card").get_attribute("data-id") == canon.id

    bad = "manufacturer = Canon AND latitud > 4"
    page.fill("#filter", bad)
    page.press("#filter", "Enter")
    error = page.locator("#filter-error")
    error.wait_for()
    assert error.locator(".before").text_content() == bad[: bad.index("latitud")]
    assert error.locator(".at").text_content() == "l"
    assert "latitud" in (error.locator(".message").text_content() or "")
    assert page.locator("#grid .card").count() == 0
    console.screenshot("bad-filter")

    page.fill("#filter", "")
    page.press("#filter", "Enter")
    expect(page.locator("#grid .card")).to_have_count(2)
    assert error.is_hidden()
    page.locator("#facet-manufacturer button", has_text="Nikon").click()
    expect(page.locator("#grid .card")).to_have_count(1)
    assert page.input_value("#filter") == 'manufacturer = "Nikon"'


def test_tag_and_label_facets_from_the_server_narrow_the_grid(
    console: Console, tmp_path: Path
) -> None:
    datalake = console.client.get_datalake()
    north = datalake.upload_data(
        photo(tmp_path, "n.jpg"), tags=["field", "dawn"], labels={"site": "north", "rig": "r1"}
    )
    datalake.upload_data(photo(tmp_path, "s.jpg"), tags=["field"], labels={"site": "south"})
    datalake.upload_data(photo(tmp_path, "u.jpg"))
    open_grid(console)
    page = console.page
    expect(page.locator("#grid .card")).to_have_count(3)
    expect(page.locator("#facet-tags button")).to_have_text(["dawn", "field"])
    keys = page.locator("#facet-labels .label-key")
    expect(keys.locator(".key")).to_have_text(["rig", "site"])
    site = page.locator('#facet-labels .label-key[data-key="site"] button')
    expect(site).to_have_text(["north", "south"])
    console.screenshot("label-facets")

    site.filter(has_text="north").click()
    expect(page.locator("#grid .card")).to_have_count(1)
    assert page.locator("#grid .card").get_attribute("data-id") == north.id
    assert page.input_value("#filter") == 'labels.site = "north"'

    page.fill("#filter", "")
    page.press("#filter", "Enter")
    expect(page.locator("#grid .card")).to_have_count(3)
    page.locator("#facet-tags button", has_text="field").click()
    expect(page.locator("#grid .card")).to_have_count(2)
    assert page.input_value("#filter") == 'tags:"field"'


def test_open_edit_and_download_an_item(console: Console, tmp_path: Path) -> None:
    path = photo(tmp_path, "field.jpg")
    datalake = console.client.get_datalake()
    data = datalake.upload_data(path, metadata={"weather": "rain", "latitude": 43.6})
    open_grid(console)
    page = console.page
    page.locator(f'.card[data-id="{data.id}"]').click()
    expect(page.locator("#item-title")).to_have_text("field.jpg")
    weather = page.locator("#item-fields tr", has=page.locator("th", has_text="weather"))
    assert weather.locator("td").nth(0).text_content() == "rain"
    assert weather.locator("td").nth(1).text_content() == "client"
    page.locator("#item-image").evaluate("img => img.decode()")
    console.screenshot("item")

    page.fill("#edit-weather", "sunny")
    page.click("#edit-form button[type=submit]")
    expect(page.locator("#edit-status")).to_have_text("Saved.")
    assert weather.locator("td").nth(0).text_content() == "sunny"
    assert datalake.get_data(data.id).weather == "sunny"

    # Someone else changes it: the console's etag is stale, and it says so.
    datalake.get_data(data.id).update_metadata({"weather": "snow"})
    page.fill("#edit-weather", "hail")
    page.click("#edit-form button[type=submit]")
    expect(page.locator("#edit-status")).to_contain_text("changed this item since")
    assert datalake.get_data(data.id).weather == "snow"

    with page.expect_download() as download:
        page.click("#download")
    saved = tmp_path / "downloaded"
    download.value.save_as(saved)
    assert saved.read_bytes() == path.read_bytes()
    assert download.value.suggested_filename == "field.jpg"


def test_untrusted_names_and_values_stay_text(console: Console, tmp_path: Path) -> None:
    name = "<img src=x onerror=alert(1)>.jpg"
    path = tmp_path / name  # any name is a label on the server; here it is also a local file
    path.write_bytes(photo(tmp_path, "x.jpg").read_bytes())
    weather = "<script>alert(1)</script>"
    data = console.client.get_datalake().upload_data(
        path,
        metadata={"weather": weather, "manufacturer": '"><svg onload=alert(2)>'},
        tags=["<b onmouseover=alert(3)>t</b>"],
        labels={"k": "<i onmouseover=alert(4)>v</i>"},
    )
    assert data.filename == name
    page = console.page
    open_grid(console)
    page.locator(f'.card[data-id="{data.id}"]').wait_for()
    assert page.locator(".card .name").text_content() == name
    expect(page.locator("#facet-tags button")).to_have_text("<b onmouseover=alert(3)>t</b>")
    expect(page.locator("#facet-labels button")).to_have_text("<i onmouseover=alert(4)>v</i>")
    assert page.locator("b").count() == 0
    assert page.locator("i").count() == 0
    page.goto(f"{console.url}#/item/{data.id}")
    expect(page.locator("#item-fields")).to_contain_text(weather)
    assert page.locator("#item-title").text_content() == name
    console.screenshot("xss")
    shown = {
        "#/": page.locator(".card .name"),
        f"#/item/{data.id}": page.locator("#item-fields"),
        "#/map": page.locator("#map-status"),
    }
    for view, ready in shown.items():
        page.goto(f"{console.url}{view}")
        expect(ready).not_to_be_empty()
        assert page.locator("img[src=x]").count() == 0
        assert page.locator("svg").count() == 0
        assert page.locator("b").count() == 0
        assert page.locator("i").count() == 0
        scripts = page.eval_on_selector_all("script", "s => s.map(x => x.src || x.textContent)")
        assert scripts == [f"{console.url}console/app.js"]
    assert console.dialogs == []


def _token_protected(tmp_path: Path) -> tuple[Settings, str]:
    """Settings of a server whose catalog holds one token (a writer's), and that token."""
    settings = Settings(
        data_dir=tmp_path / "data",
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        auth_cache_seconds=0,
    )
    with serving(settings) as handle:
        token = on_server(handle, handle.running.tokens.create("acme", Role.WRITE)).secret
    return settings, token


def test_a_token_protected_server_asks_for_one(browser: Browser, tmp_path: Path) -> None:
    settings, token = _token_protected(tmp_path)
    # The same catalog, now with a token: serve it again and use the console against it.
    for console in _console(browser, settings, token=token):
        data = console.client.get_datalake().upload_data(photo(tmp_path, "secret.jpg"))
        page = console.page
        page.goto(console.url)
        page.wait_for_selector("#login:not([hidden])")
        assert page.locator("#grid-view").is_hidden()
        assert page.locator(".card").count() == 0
        refused = page.evaluate("fetch('/v1/data').then(r => r.status)")
        assert refused == 401
        console.screenshot("login")

        page.fill("#token", "mlk_not-a-token")
        page.press("#token", "Enter")
        page.wait_for_selector("#login-error:not([hidden])")
        assert page.locator(".card").count() == 0

        page.fill("#token", token)
        page.press("#token", "Enter")
        page.locator(f'.card[data-id="{data.id}"]').wait_for()
        preview = page.locator(f'.card[data-id="{data.id}"] img[src^="blob:"]')
        preview.evaluate("img => img.decode()")  # fetched with the token
        console.screenshot("logged-in")


def _hold_if_sent_with(token: str, held: list[Route], route: Route) -> None:
    """A route handler: keeps the requests made with `token` in `held`, lets the others go."""
    if route.request.headers.get("authorization") == f"Bearer {token}":
        held.append(route)
    else:
        route.continue_()


def _answers(asked: Request, answer: Response) -> bool:
    return answer.request == asked


def test_a_refusal_arriving_after_a_new_token_does_not_log_out(
    browser: Browser, tmp_path: Path
) -> None:
    # A mistyped token, then the right one at once: answers to the first one's requests may
    # still be on their way. Their 401 must not throw the new token away.
    settings, token = _token_protected(tmp_path)
    for console in _console(browser, settings, token=token):
        data = console.client.get_datalake().upload_data(photo(tmp_path, "late.jpg"))
        page = console.page
        held: list[Route] = []  # answered later, once the right token is in
        page.route("**/v1/facets/**", functools.partial(_hold_if_sent_with, "mlk_wrong", held))
        page.goto(console.url)
        page.wait_for_selector("#login:not([hidden])")
        page.fill("#token", "mlk_wrong")
        page.press("#token", "Enter")
        page.wait_for_selector("#login-error:not([hidden])")
        page.fill("#token", token)
        page.press("#token", "Enter")
        card = page.locator(f'.card[data-id="{data.id}"]')
        card.wait_for()
        assert held, "the wrong token's facet requests were not held"
        for route in held:
            with page.expect_response(functools.partial(_answers, route.request)):
                route.continue_()
        page.evaluate("() => new Promise(resolve => setTimeout(resolve, 200))")
        assert page.locator("#login").is_hidden()
        assert page.locator("#grid-view").is_visible()
        assert card.is_visible()
        assert page.evaluate("sessionStorage.getItem('metalake-token')") == token


def test_the_map_places_gps_tagged_items(console: Console, tmp_path: Path) -> None:
    datalake = console.client.get_datalake()
    datalake.upload_data(
        photo(tmp_path, "paris.jpg"), metadata={"latitude": 48.85, "longitude": 2.35}
    )
    datalake.upload_data(photo(tmp_path, "nowhere.jpg"))
    page = console.page
    page.goto(f"{console.url}#/map")
    expect(page.locator("#map-status")).to_contain_text("GPS")
    assert (page.locator("#map-status").text_content() or "").startswith("1 GPS-tagged")
    console.screenshot("map")
