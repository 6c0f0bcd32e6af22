"""The Label Studio data manager in a browser: logging in, the task list, its column and order menus (Label Studio
1.23, community edition), as the annotator and the project's manager click them."""

from __future__ import annotations

import contextlib
from typing import Any

from proxyloop.testing import LabelStudioServer


def log_in(page: Any, labelstudio: LabelStudioServer) -> None:
    page.goto(f"{labelstudio.url}/user/login", wait_until="networkidle")
    page.fill("input[name=email]", labelstudio.username)
    page.fill("input[name=password]", labelstudio.password)
    page.click("button[type=submit]")
    page.wait_for_load_state("networkidle")


def open_task_list(page: Any, url: str, project: int) -> None:
    page.goto(f"{url}/projects/{project}/data", wait_until="networkidle")
    page.locator("[data-testid=table-row]").first.wait_for(timeout=60_000)


def menu_item(page: Any, text: str) -> Any:
    """An entry of the data manager's open drop-down (Columns, Order by, Actions)."""
    return page.locator(".lsf-menu-dm__item").filter(visible=True).get_by_text(text, exact=True)


def arrange_columns(page: Any) -> None:
    """Show the prediction score, hide the feature vectors, sort by the score, highest first (the data
    manager keeps these in the tab, on the server)."""
    page.get_by_role("button", name="Columns").click()
    for column in ("Prediction score", "x", "y_a", "y_b"):
        menu_item(page, column).click()
        page.wait_for_load_state("networkidle")
    close_menu(page)
    page.get_by_role("button", name="Order by").click()
    menu_item(page, "Prediction score").click()
    page.wait_for_load_state("networkidle")
    close_menu(page)
    page.get_by_role("button", name="Sort descending").click()  # named for what it does
    page.get_by_role("button", name="Sort ascending").wait_for(timeout=30_000)
    page.wait_for_load_state("networkidle")


def close_menu(page: Any) -> None:
    """The data manager's drop-downs stay open after a choice; Escape or a click on empty page closes them. The
    click goes to the bottom right corner: the menus open on the left, and the Columns list (two dozen entries)
    can reach the bottom middle of the window, where a click toggled a column instead (a CI failure)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    items, size = page.locator(".lsf-menu-dm__item").filter(visible=True), page.viewport_size
    page.keyboard.press("Escape")
    for _ in range(3):
        if items.count() == 0:
            return
        page.mouse.click(size["width"] - 30, size["height"] - 20)
        with contextlib.suppress(PlaywrightTimeout):
            items.first.wait_for(state="hidden", timeout=5_000)
    items.first.wait_for(state="hidden", timeout=5_000)
