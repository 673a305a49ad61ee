"""The web annotation UI (``slidesam serve``): a FastAPI app and one static page.

The web framework is imported only under this package: ``slidesam.web.app`` builds the app;
``state``, ``annotate`` and ``files`` hold the session state, the long actions and the file
checks without importing it.
"""
