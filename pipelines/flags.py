"""Checked flag types: a bad value stops ``parse_args`` with ``argument --flag: ...`` before anything loads.

Every numeric flag of the scripts, the evaluation and the servers is declared with one of these types
(``tests/test_flags.py`` fails on a bare ``type=int`` / ``type=float``), so a new flag gets its check by
its declaration. Light on purpose: argparse and the standard library only, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, Iterable

SEED_MAX = 2**32 - 1  # numpy's (and so accelerate.set_seed's) largest seed


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (argparse prints the whole usage, ~90 lines here, first)
    and which takes flags by their whole names only (a prefix such as ``--conf`` is no flag: ``--config``
    is read before the parser runs, and a silent prefix match could change a run)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def _number(text: str, kind: type, what: str, accept: Callable[[float], bool], inf_ok: bool = False):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if math.isnan(value) or (math.isinf(value) and not inf_ok) or not accept(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, "a positive integer", lambda v: v > 0)


def non_negative_int(text: str) -> int:
    return _number(text, int, "an integer >= 0", lambda v: v >= 0)


def count_or_all(text: str) -> int:
    """A count >= 0, or -1 for all."""
    return _number(text, int, "an integer >= 0, or -1 for all", lambda v: v >= -1)


def seed(text: str) -> int:
    return _number(text, int, f"an integer in [0, {SEED_MAX}]", lambda v: 0 <= v <= SEED_MAX)


def port(text: str) -> int:
    return _number(text, int, "a port number in [0, 65535] (0: any free port)", lambda v: 0 <= v <= 65535)


def positive_float(text: str) -> float:
    return _number(text, float, "a positive finite number", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    return _number(text, float, "a finite number >= 0", lambda v: v >= 0)


def finite_float(text: str) -> float:
    return _number(text, float, "a finite number", lambda v: True)


def positive_float_or_inf(text: str) -> float:
    return _number(text, float, "a positive number (or inf)", lambda v: v > 0, inf_ok=True)


def fraction(text: str) -> float:
    """In [0, 1): a dropout rate, an Adam beta."""
    return _number(text, float, "a number in [0, 1)", lambda v: 0 <= v < 1)


def list_of(item: Callable[[str], object], what: str) -> Callable[[str], list]:
    """A comma-separated, non-empty list whose every item passes ``item``."""

    def parse(text: str) -> list:
        parts = [part.strip() for part in text.split(",")]
        if not text.strip() or any(not part for part in parts):
            raise argparse.ArgumentTypeError(f"must be a comma-separated list of {what} with no empty item, "
                                             f"got {text!r}")
        try:
            return [item(part) for part in parts]
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"every item {str(error).removeprefix('must ')} (in {text!r})") from None

    parse.__name__ = f"list of {what}"
    return parse


def names(text: str) -> list[str]:
    """Comma-separated names (module names, reward specs): non-empty, no empty item."""
    return list_of(str, "names")(text)


def prompt_list(text: str) -> list[str]:
    """'|'-separated prompts, at least one that is not blank."""
    prompts = [part.strip() for part in text.split("|") if part.strip()]
    if not prompts:
        raise argparse.ArgumentTypeError(f"must hold at least one prompt ('a cat|a dog'), got {text!r}")
    return prompts


def seed_list(text: str) -> list[int]:
    """Seeds as 'A-B' (inclusive, A <= B) or 'a,b,c', each in [0, SEED_MAX]."""
    spec, problem = text.strip(), None
    try:
        if "-" in spec:
            first, _, last = spec.partition("-")
            start, stop = seed(first.strip()), seed(last.strip())
            if stop >= start:
                return list(range(start, stop + 1))
            problem = "A > B"
        else:
            return list_of(seed, "seeds")(spec)
    except argparse.ArgumentTypeError as error:
        problem = str(error).removeprefix("must be ")
    raise argparse.ArgumentTypeError(f"must be 'A-B' (A <= B) or 'a,b,c', seeds in [0, {SEED_MAX}], got {text!r} "
                                     f"({problem})")


def lazily_checked(check: Callable[[str], object], name: str) -> Callable[[str], str]:
    """A type that calls ``check(text)`` (which imports what it needs only then) and keeps the text."""

    def parse(text: str) -> str:
        try:
            check(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text

    parse.__name__ = name
    return parse


def lr_scheduler_name(text: str) -> None:
    """One of the scheduler names diffusers' ``get_scheduler`` accepts (diffusers' own list)."""
    from diffusers.optimization import SchedulerType

    accepted = [member.value for member in SchedulerType]
    if text not in accepted:
        raise ValueError(f"must be one of {', '.join(accepted)}, got {text!r}")


def option(default, kind: Callable | None, text: str, choices: Iterable[str] | None = None):
    """A field of a method's options dataclass that is also its flag ``--<field name>`` (``add_options``):
    the option is declared once, with its checked type, default and help."""
    import dataclasses

    return dataclasses.field(default=default, metadata={"type": kind, "help": text,
                                                        "choices": None if choices is None else list(choices)})


def add_options(group, options_type) -> None:
    """One flag per field of ``options_type`` (fields declared with ``option``)."""
    import dataclasses

    for item in dataclasses.fields(options_type):
        meta = item.metadata
        group.add_argument(f"--{item.name}", default=item.default, type=meta["type"], choices=meta["choices"],
                           help=meta["help"])


CHECKED_TYPES = {positive_int, non_negative_int, count_or_all, seed, port, positive_float, non_negative_float,
                 finite_float, positive_float_or_inf, fraction, names, prompt_list, seed_list}


def explicit_flags(parser: argparse.ArgumentParser, argv: Iterable[str] | None) -> set[str]:
    """The ``dest`` of every option given on the command line ``argv`` (not left at its default)."""
    import sys

    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:  # noqa: SLF001 - argparse offers no public list of actions
        if not action.option_strings or isinstance(action, argparse._HelpAction):  # noqa: SLF001
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            strings = [s for s in action.option_strings if not s.startswith("--no-")]
            probe.add_argument(*strings, dest=action.dest, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS)
        elif action.nargs == 0:  # store_true / store_false / store_const / count
            probe.add_argument(*action.option_strings, dest=action.dest, action="count", default=argparse.SUPPRESS)
        else:
            probe.add_argument(*action.option_strings, dest=action.dest, nargs=action.nargs, action="append",
                               default=argparse.SUPPRESS)
    given, _ = probe.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    return set(vars(given))


def refuse_idle_flags(given: set[str], rules: Iterable[tuple[Iterable[str], bool, str]]) -> None:
    """A flag that does nothing in this run is an error: ``rules`` are (flags, applies, when) triples,
    e.g. (["caption_column"], args.preference_dataset is not None, "with --preference_dataset")."""
    for flags, applies, when in rules:
        idle = sorted(flag for flag in flags if flag in given)
        if idle and not applies:
            listed = ", ".join(f"--{flag}" for flag in idle)
            raise ValueError(f"{listed} {'does' if len(idle) == 1 else 'do'} nothing in this run: "
                             f"{'it applies' if len(idle) == 1 else 'they apply'} only {when}")


# ---------------------------------------------------------------------------------------------
# --config: a YAML file of flag values, the command line over it
# ---------------------------------------------------------------------------------------------

CONFIG_HELP = ("A YAML file of flag values, keyed by flag name without the dashes (learning_rate: 1.0e-5); "
               "flags given on the command line override it. configs/ holds the paper's recipes.")


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE.yaml", help=CONFIG_HELP)


def config_loader():
    """A YAML loader whose booleans are true / false only (YAML 1.2): ``mixed_precision: no`` stays "no"."""
    import re

    import yaml

    class ConfigLoader(yaml.SafeLoader):
        pass

    bool_tag = "tag:yaml.org,2002:bool"
    ConfigLoader.yaml_implicit_resolvers = {first: [(tag, rule) for tag, rule in rules if tag != bool_tag]
                                            for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    ConfigLoader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    return ConfigLoader


def read_config(path: str) -> dict:
    """The flag values of a --config file (a YAML mapping)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.load(handle, Loader=config_loader())  # noqa: S506 - a SafeLoader subclass
    except OSError as error:
        raise ValueError(f"--config {path}: cannot be read ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path}: not valid YAML ({' '.join(str(error).split())})") from None
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}")
    return values


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action of every option a config file may set (not --help, not --config)."""
    return {action.dest: action for action in parser._actions  # noqa: SLF001 - no public list of actions
            if action.option_strings and action.dest not in ("help", "config")}


def config_tokens(parser: argparse.ArgumentParser, values: dict, path: str) -> dict[str, list[str]]:
    """Per key of a config file, the command-line tokens of its value, so that each is checked exactly as the
    flag is; an unknown key is an error naming it (and the closest flag)."""
    import difflib

    actions, tokens = option_actions(parser), {}
    for key, value in values.items():
        if key not in actions:
            close = difflib.get_close_matches(key, list(actions), n=1)
            raise ValueError(f"--config {path}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close
                                                                        else " (keys are flag names without --)"))
        tokens[key] = action_tokens(actions[key], value, path)
    return tokens


def action_tokens(action: argparse.Action, value, path: str) -> list[str]:
    flag = action.option_strings[0]
    if value is None:
        return []
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ValueError(f"--config {path}: {action.dest} is a switch: true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else f"--no-{flag[2:]}"]
        return [flag] if value != bool(action.default) else []  # store_true given true
    if isinstance(value, (list, tuple)):
        if action.nargs in ("*", "+") or isinstance(action.nargs, int):
            return [flag, *map(str, value)]
        separator = "|" if action.type is prompt_list else ","  # the flag's own list syntax
        return [f"{flag}={separator.join(map(str, value))}"]
    if isinstance(value, dict):
        raise ValueError(f"--config {path}: {action.dest} takes a value, not a mapping")
    return [f"{flag}={value}"]


def parse_with_config(parser: argparse.ArgumentParser, argv: Iterable[str] | None = None
                      ) -> tuple[argparse.Namespace, set[str]]:
    """Parse ``argv`` over the values of its ``--config`` file; returns the namespace and the flags given (on
    the command line or in the file). A bad key or value stops with a one-line error naming it."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    probe.add_argument("--config", default=None)
    path = probe.parse_known_args(argv)[0].config
    given = explicit_flags(parser, argv)
    if path is None:
        return parser.parse_args(argv), given
    try:
        values = read_config(path)
        per_key = config_tokens(parser, values, path)  # every key checked, those the command line overrides too
    except ValueError as error:
        parser.error(str(error))
    tokens = [token for key, key_tokens in per_key.items() if key not in given for token in key_tokens]
    return parser.parse_args(tokens + argv), given | {key for key, value in values.items() if value is not None}


def changed_flags(parser: argparse.ArgumentParser, values: dict) -> dict:
    """Of a run's flag values (dest -> value), those that differ from their defaults, as a --config file
    holds them."""
    changed, listed = {}, (lambda value: list(value) if isinstance(value, tuple) else value)
    for dest, action in option_actions(parser).items():
        value = listed(values.get(dest, action.default))
        if value != listed(action.default) and value is not None:
            changed[dest] = value
    return changed


def config_yaml(values: dict, header: str) -> str:
    import yaml

    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(values, sort_keys=False, allow_unicode=True, width=120)
