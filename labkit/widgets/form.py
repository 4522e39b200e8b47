"""The controls of the panel: one widget per RunConfig field, built from ``fields_info()``.

Nothing here lists a choice by hand. A field with choices (a registry such as the sync
modes or the compressors, or a fixed set such as ``--easgd-variant``) becomes a dropdown
of exactly those names; a yes/no field becomes a checkbox; every other field becomes a
text box whose text goes through ``RunConfig.parse_value``, the parser the command line
uses, so a typo gets the same message in both places. The compressor's parameters are
rebuilt from its registered defaults whenever the compressor changes, and the settings shown
for a sync mode or a parallelism are those it declared at registration (``settings=``).

Every control shows, on hover over its label and over the control itself, its command-line
option and what it means: the help text ``labkit train --help`` prints (``fields_info()``).
ipywidgets 8 draws a control's ``tooltip`` only when the control has no description (and a
dropdown's or a text box's label never gets it), so each control is drawn without one,
beside a label of its own that carries the same help (:class:`Labelled`).
"""

from __future__ import annotations

import html
import os

import ipywidgets as w

from .. import registry as reg
from ..config import ConfigError, RunConfig, fields_info, parse_params

# The fields the panel shows, row by row; every other field keeps the base config's value.
ROWS = (
    ("parallelism", "sync", "workers"),
    ("compression", "error_feedback"),
    ("launcher", "backend"),
    ("model", "dataset"),
    ("lr", "batch_size", "steps"),
)
# Fields whose choices come from a registry: their selected entry's help is shown.
DESCRIBED = {"parallelism": reg.PARALLELISMS, "sync": reg.SYNC_MODES, "compression": reg.COMPRESSORS}

_STYLE = {"description_width": "initial"}


def help_text(info: dict) -> str:
    """What hovering over a control says: its option and its meaning, as ``--help`` says them."""
    text = f"{info['option']}: {info['help']}"
    if info["choices"]:
        text += f" ({', '.join(map(str, info['choices']))})"
    return text


class Labelled(w.HBox):
    """A control beside its label, both showing ``help`` on hover. ``value``, ``options``
    and ``description`` read (and ``value`` sets) the control's; ``control`` is the control.

    The box carries the control's CSS class (``widget-dropdown``, ``widget-text``, ...),
    so it is found in the page as the control with its label would be."""

    def __init__(self, label: str, control: w.Widget, help: str, css_class: str):
        self.control = control
        self._label = label
        text = w.HTML(f"<span title=\"{html.escape(help)}\" style=\"padding-right:0.5em\">"
                      f"{html.escape(label)}</span>", tooltip=help)
        super().__init__([text, control], layout=w.Layout(width="auto", align_items="center"))
        self.add_class(css_class)
        self.add_class("labkit-control")

    @property
    def description(self) -> str:
        return self._label

    @property
    def value(self):
        return self.control.value

    @value.setter
    def value(self, value) -> None:
        self.control.value = value

    @property
    def options(self):
        return self.control.options

    @property
    def help(self) -> str:
        return self.control.tooltip


def field_widget(info: dict, value) -> Labelled:
    """The control for one field of ``fields_info()``, showing ``value``, with its label."""
    label = info["name"].replace("_", " ")
    common = {"tooltip": help_text(info), "style": _STYLE}
    if info["choices"]:
        control, css = w.Dropdown(options=list(info["choices"]), value=value, **common), "widget-dropdown"
    elif info["type"] is bool:
        control, css = w.Checkbox(value=bool(value), indent=False, **common), "widget-checkbox"
    elif info["name"] == "workers":
        control = w.IntSlider(value=value, min=1, max=max(8, os.cpu_count() or 1), **common)
        css = "widget-slider"
    else:
        control = w.Text(value="" if value is None else str(value), continuous_update=False,
                         layout=w.Layout(width="8em"), **common)
        css = "widget-text"
    return Labelled(label, control, common["tooltip"], css)


def control_of(widget):
    return getattr(widget, "control", widget)


def widget_value(name: str, widget: w.Widget):
    """The field value a widget holds (text parsed as the command line would)."""
    if isinstance(control_of(widget), w.Text):
        return RunConfig.parse_value(name, widget.value)
    return widget.value


def applies_to(sync: str, name: str) -> bool:
    """Does the setting ``name`` belong to mode ``sync``? (the mode declared it)"""
    return name in reg.SYNC_MODES.entry(sync).meta.get("settings", ())


def parallelism_settings() -> list[str]:
    """Every setting some parallelism declared, in the order they were declared."""
    names: list[str] = []
    for entry in reg.PARALLELISMS.entries():
        names += [n for n in entry.meta.get("settings", ()) if n not in names]
    return names


class ConfigForm:
    """The panel's controls. ``config()`` turns them into a validated RunConfig."""

    def __init__(self, base: RunConfig):
        self.base = base
        self.info = {f["name"]: f for f in fields_info()}
        self.widgets = {name: field_widget(self.info[name], getattr(base, name))
                        for row in ROWS for name in row}
        self.sync_settings = {f["name"]: field_widget(f, getattr(base, f["name"]))
                              for f in self.info.values() if f["group"] == "sync"}
        self.parallel_settings = {name: field_widget(self.info[name], getattr(base, name))
                                  for name in parallelism_settings()}
        self.param_widgets: dict[str, w.Widget] = {}
        self.params_box = w.HBox()
        self.settings_box = w.HBox()
        self.parallel_box = w.HBox()
        self.description = w.HTML()
        self._listeners = []
        for widget in [*self.widgets.values(), *self.sync_settings.values(), *self.parallel_settings.values()]:
            control_of(widget).observe(self._changed, names="value")
        self._build_params(base.compression_params)
        self._show_sync_settings()
        self._show_parallel_settings()
        self._describe()
        parallel, compression, *rest = (w.HBox([self.widgets[name] for name in row]) for row in ROWS)
        self.box = w.VBox([parallel, self.parallel_box, self.settings_box, compression, self.params_box, *rest,
                           self.description])

    # --- events ----------------------------------------------------------------------------
    def on_change(self, callback) -> None:
        """Call ``callback()`` whenever any control changes."""
        self._listeners.append(callback)

    def _changed(self, change) -> None:
        owner = change["owner"]
        if owner is control_of(self.widgets["compression"]):
            self._build_params({})
        if owner is control_of(self.widgets["sync"]):
            self._show_sync_settings()
        if owner is control_of(self.widgets["parallelism"]):
            self._show_parallel_settings()
        self._describe()
        for callback in self._listeners:
            callback()

    def _build_params(self, values: dict) -> None:
        """One control per parameter of the selected compressor, at its registered default."""
        compressor = self.widgets["compression"].value
        defaults = reg.COMPRESSORS.entry(compressor).meta.get("params", {})
        self.param_widgets = {}
        for key, default in defaults.items():
            value = values.get(key, default)
            info = {"name": key, "option": "--compression-param", "type": type(default),
                    "help": f"{compressor}'s {key} (default {default!r})", "choices": ()}
            self.param_widgets[key] = field_widget(info, value)
            control_of(self.param_widgets[key]).observe(self._changed, names="value")
        self.params_box.children = list(self.param_widgets.values())

    def _show_sync_settings(self) -> None:
        sync = self.widgets["sync"].value
        self.settings_box.children = [widget for name, widget in self.sync_settings.items()
                                      if applies_to(sync, name)]

    def _show_parallel_settings(self) -> None:
        declared = reg.PARALLELISMS.entry(self.widgets["parallelism"].value).meta.get("settings", ())
        self.parallel_box.children = [widget for name, widget in self.parallel_settings.items() if name in declared]

    def _describe(self) -> None:
        lines = []
        for name, registry in DESCRIBED.items():
            choice = self.widgets[name].value
            lines.append(f"<b>{name}</b> {html.escape(f'{choice}: {registry.entry(choice).help}')}")
        self.description.value = "<br>".join(lines)

    # --- the config ------------------------------------------------------------------------
    def compression_params(self) -> dict:
        params = {}
        for key, widget in self.param_widgets.items():
            if isinstance(control_of(widget), w.Text):
                params.update(parse_params([f"{key}={widget.value}"]))
            else:
                params[key] = widget.value
        return params

    def config(self) -> RunConfig:
        """The RunConfig the controls describe, validated; ConfigError when it is not valid."""
        values = {name: widget_value(name, widget) for name, widget in self.widgets.items()}
        values.update({name: widget_value(name, widget) for name, widget in self.sync_settings.items()
                       if widget in self.settings_box.children})
        values.update({name: widget_value(name, widget) for name, widget in self.parallel_settings.items()
                       if widget in self.parallel_box.children})
        values["compression_params"] = self.compression_params()
        if values["steps"] is not None:
            values["epochs"] = None  # the panel counts in steps
        return self.base.replace(**values).validate()

    def problem(self) -> ConfigError | None:
        try:
            self.config()
        except ConfigError as error:
            return error
        return None
