"""Guardian-Loop: the app. Run with `streamlit run streamlit_app.py`.

This entry file sets the page up, keeps the shared prompt in step with the URL, draws the sidebar
and routes to one of the pages (URL paths /probe, /heatmap, /heads, /circuit, /compare, /batch, /loop; the root
URL opens /probe).
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import streamlit as st

from guardian.ui import state, widgets

log = logging.getLogger("guardian.ui")

widgets.configure_page()

PROBE = st.Page("pages/probe.py", title="Probe", icon=":material/search:", url_path="probe")
PAGES = [
    PROBE,
    st.Page("pages/heatmap.py", title="Heatmap", icon=":material/palette:", url_path="heatmap"),
    st.Page("pages/heads.py", title="Heads", icon=":material/grid_view:", url_path="heads"),
    st.Page("pages/circuit.py", title="Circuit", icon=":material/cable:", url_path="circuit"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:", url_path="compare"),
    st.Page("pages/loop.py", title="Loop", icon=":material/model_training:", url_path="loop"),
    st.Page("pages/batch.py", title="Batch", icon=":material/table_view:", url_path="batch"),
]


def home() -> None:
    """The app's root URL opens the Probe page at /probe, keeping any ?prompt= of the link."""
    st.switch_page(PROBE, query_params=st.query_params.to_dict())


page = st.navigation([st.Page(home, title="Home", default=True, visibility="hidden"), *PAGES],
                     position="sidebar")
if page.url_path == "":
    page.run()  # redirects to /probe
widgets.page_setup(page.url_path)
with state.routing():
    try:
        page.run()
    except Exception:  # noqa: BLE001 - last line of defence: a sentence, never a traceback
        log.exception("Page %s failed", page.url_path)
        st.error("Sorry, this page ran into a problem. The details were written to the server log; "
                 "try another prompt or reload the page.", icon=":material/error:")
