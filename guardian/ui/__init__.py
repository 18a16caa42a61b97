"""The Streamlit layer of Guardian-Loop: state (judges, caches, URL), charts and shared widgets.

The analysis package (`guardian.*`) never imports Streamlit; this sub-package is the only place
that does, and the pages in `pages/` only draw what `guardian` returns.
"""
