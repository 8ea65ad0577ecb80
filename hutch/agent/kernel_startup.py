"""Run in every Python kernel as it starts (`--IPKernelApp.exec_lines`): E2B's result formats.

- `e2b/chart`: a matplotlib figure's data (elements, labels, scales), extracted by E2B's own
  `e2b_charts` where the template has it, beside the figure's PNG;
- `e2b/data`: a pandas DataFrame's columns as JSON lists, beside its HTML and text;
- `PIL.Image.Image.show()` displays the image (a sandbox has no image viewer).

Of the user's libraries only PIL is imported here (to patch `show`); pandas, matplotlib and
e2b_charts load when the user's code does, or a figure is first displayed. No name is left in
the user's namespace.
"""

from __future__ import annotations


def _setup() -> None:
    import json
    import sys

    from IPython import get_ipython
    from IPython.core.formatters import BaseFormatter
    from traitlets import ObjectName, Unicode

    shell = get_ipython()
    if shell is None:
        return

    def formatter(mime: str, module: str, name: str, convert):
        """A formatter for `mime` of the instances of `module.name`, matched by class when the
        object is displayed: not a printer registered by name, since pandas names its classes'
        module "pandas" in some versions, and matplotlib's inline backend drops every
        formatter's Figure printer when it sets up its own (IPython's select_figure_formats)."""

        class Formatter(BaseFormatter):
            format_type = Unicode(mime)
            print_method = ObjectName("_repr_" + mime.replace("/", "_") + "_")
            _return_type = (dict,)

            def __call__(self, obj):
                loaded = sys.modules.get(module)
                if loaded is not None and isinstance(obj, getattr(loaded, name)):
                    return convert(obj)
                return super().__call__(obj)

        return Formatter(parent=shell.display_formatter)

    def frame_data(frame) -> dict:
        # Each column's values as JSON takes them (NaN -> null, timestamps -> ISO text).
        return {str(name): json.loads(col.to_json(orient="values", date_format="iso")) for name, col in frame.items()}

    def figure_chart(figure) -> dict | None:
        try:
            from e2b_charts import chart_figure_to_dict  # type: ignore[import-untyped]
        except ImportError:
            return None  # the template has no chart extractor: the PNG alone
        try:
            chart = chart_figure_to_dict(figure)
        except Exception:
            return None  # a figure the extractor does not understand still shows as PNG
        return chart or None

    formatters = shell.display_formatter.formatters
    formatters["e2b/data"] = formatter("e2b/data", "pandas", "DataFrame", frame_data)
    formatters["e2b/chart"] = formatter("e2b/chart", "matplotlib.figure", "Figure", figure_chart)
    active = shell.display_formatter.active_types
    shell.display_formatter.active_types = [*active, *(t for t in ("e2b/data", "e2b/chart") if t not in active)]

    try:
        from PIL import Image
    except ImportError:
        return

    def show(self, title=None) -> None:
        from IPython.display import display

        display(self)

    Image.Image.show = show  # type: ignore[method-assign]


_setup()
