"""Property tests: any registry file or ``--set`` value gives a valid configuration or a
clean one-line :class:`DiffuseError`, never another exception.

Inputs are drawn near the real schema (real kinds, entry names, field names and
implementation names mixed with junk, values of every TOML type including huge integers,
NaN, infinities, dates, nested tables) so most examples get deep into validation instead
of failing at the first table name. Hypothesis runs derandomized (a fixed seed).
"""

from __future__ import annotations

import datetime as dt

import pytest
import tomli_w
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diffuse_engine import DiffuseError, Engine
from diffuse_engine.core.registry import COMPONENT_TABLES, RUN_TABLE

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def engine():
    return Engine(autoload=False)


def _schema(engine):
    kinds = [*COMPONENT_TABLES, RUN_TABLE]
    fields, types = set(), set()
    for kind in COMPONENT_TABLES:
        for name in engine.catalogue.names(kind):
            types.add(name)
            fields.update(engine.catalogue.get(kind, name).Config.model_fields)
    fields.update(["sde", "solver", "score", "data", "n", "seed", "device", "type"])
    return kinds, sorted(fields), sorted(types), engine.registry.as_dict()


SCHEMA = _schema(Engine(autoload=False))
KINDS, FIELDS, TYPES, DEFAULT = SCHEMA
ENTRY_NAMES = sorted({n for t in DEFAULT.values() for n in t} | set(TYPES))

junk = st.text(min_size=0, max_size=8)
kinds = st.one_of(st.sampled_from(KINDS), junk)
names = st.one_of(st.sampled_from(ENTRY_NAMES), junk)
field_names = st.one_of(st.sampled_from(FIELDS), junk)
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),  # TOML's integer range
    st.integers(min_value=-3, max_value=5000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -1.0, 1e-300, 1e300, 0.5, 2.0]),
    st.sampled_from(
        TYPES + ENTRY_NAMES + ["none", "euler", "explicit", "cpu", "cuda:7", "a.b:C", "os:system"]
    ),
    junk,
    st.dates(min_value=dt.date(1, 1, 1)),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(junk, inner, max_size=3)),
    max_leaves=8,
)
entries = st.dictionaries(field_names, values, max_size=5)
registries = st.dictionaries(
    kinds, st.one_of(st.dictionaries(names, entries, max_size=3), values), max_size=3
)


def _check(build):
    """Run ``build``: a DiffuseError must be one non-empty line; anything else is a bug."""
    try:
        out = build()
    except DiffuseError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg, repr(msg)
        event(f"clean error: {type(exc).__name__}")
        return None
    event("valid")
    return out


@FUZZ
@given(data=registries)
def test_any_registry_file_is_valid_or_a_clean_error(engine, tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "reg.toml"
    path.write_text(tomli_w.dumps(data))
    built = _check(lambda: Engine(registry=path, autoload=False))
    if built is not None:  # valid: every entry resolves and every preset plans
        for kind in COMPONENT_TABLES:
            for name in built.registry.names(kind):
                built.resolve(kind, name)
        for name in built.registry.names(RUN_TABLE):
            _check(lambda name=name: built.plan_run(name))


@FUZZ
@given(
    text=st.one_of(
        st.text(max_size=80),
        st.builds(
            lambda k, n, f, v: f"[{k}.{n}]\n{f} = {v}\n",
            st.sampled_from(KINDS),
            st.sampled_from(ENTRY_NAMES),
            st.sampled_from(FIELDS),
            st.sampled_from(
                [
                    "1",
                    "-1",
                    "1e999",
                    "nan",
                    "inf",
                    '"x"',
                    "[1, [2]]",
                    "{a=1}",
                    "1979-05-27",
                    "true",
                    '"a:b"',
                    "0x10",
                    "99999999999999999999",
                    "",
                    "= =",
                    "[",
                    '"unterminated',
                ]
            ),
        ),
    )
)
def test_any_registry_text_is_valid_or_a_clean_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "reg.toml"
    path.write_text(text)
    _check(lambda: Engine(registry=path, autoload=False))


def _entry_fields(kind, entry):
    typ = entry.get("type")
    if kind in COMPONENT_TABLES and typ in TYPES:
        for k in COMPONENT_TABLES:
            try:
                return ["type", *Engine(autoload=False).catalogue.get(k, typ).Config.model_fields]
            except DiffuseError:
                continue
    return ["type", "sde", "solver", "score", "n", "seed", "device"]


# real KIND.NAME.FIELD keys (type among them), so values reach the validators
qualified = [
    f"{k}.{n}.{f}"
    for k, table in DEFAULT.items()
    for n, e in table.items()
    for f in _entry_fields(k, e)
]


def _inline(value) -> str:
    """``value`` as the TOML text a user would type after ``=``."""
    text = tomli_w.dumps({"v": value})
    return text[4:].strip() if text.startswith("v = ") else text


set_keys = st.one_of(
    field_names,
    st.sampled_from(qualified),
    st.builds(lambda k, f: f"{k}.{f}", kinds, field_names),
    st.builds(lambda k, n, f: f"{k}.{n}.{f}", kinds, names, field_names),
    st.text(max_size=20),
)
set_values = st.one_of(
    st.text(max_size=20),
    st.sampled_from(
        [
            "1",
            "-1",
            "0",
            "1e999",
            "-inf",
            "nan",
            "true",
            '"vp"',
            "[1, 2]",
            "[[1, 2]]",
            "{a = 1}",
            "1979-05-27T07:32:00Z",
            "99999999999999999999",
            '"os:system"',
            "ancestral",
            "none",
            "'explicit'",
        ]
    ),
    values.map(_inline),
)


@FUZZ
@given(
    items=st.lists(
        st.one_of(st.builds(lambda k, v: f"{k}={v}", set_keys, set_values), st.text(max_size=30)),
        min_size=1,
        max_size=3,
    )
)
def test_any_set_values_plan_or_fail_cleanly(items):
    """``--set`` strings reach the engine and the planner of ``diffuse run``."""

    def build():
        engine = Engine(sets=items, autoload=False)
        return engine.plan_run("default")

    _check(build)
