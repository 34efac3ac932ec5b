"""common/settings.py: a dataclass's fields become flags, keywords and checks."""

import argparse
import dataclasses

import pytest

from common.settings import Settings, at_least, positive, setting


@dataclasses.dataclass
class Example(Settings):
    page_size: int = setting(16, "tokens per page", check=positive)
    timeout: float = setting(30.0, "seconds", check=lambda v: None if v > 0 else "must be positive")
    name: str | None = setting(None, "a name")
    policy: str = setting("fcfs", "a policy", choices=("fcfs", "lpm"))
    modules: list[str] | str | None = setting(None, "modules", choices=("q", "k", "all"))
    disable_thing: bool = setting(False, "turn it off")
    offset: int = setting(0, "where to start", check=at_least(0), group="placement")

    def validate(self) -> None:
        if self.policy == "lpm" and self.disable_thing:
            raise ValueError("policy='lpm' needs the thing")


def parse(argv: list[str]) -> Example:
    parser = argparse.ArgumentParser()
    Example.add_arguments(parser)
    return Example.from_namespace(parser.parse_args(argv))


def test_each_field_is_a_flag_with_its_type_default_and_choices():
    assert parse([]) == Example()
    got = parse(["--page-size", "4", "--timeout", "2.5", "--name", "x", "--policy", "lpm", "--modules", "q", "k",
                 "--offset", "3"])
    assert got == Example(page_size=4, timeout=2.5, name="x", policy="lpm", modules=["q", "k"], offset=3)
    assert parse(["--disable-thing"]).disable_thing is True
    with pytest.raises(SystemExit):
        parse(["--policy", "nope"])
    with pytest.raises(SystemExit):
        parse(["--page-size", "four"])


def test_help_is_grouped_and_keeps_percent_signs():
    parser = argparse.ArgumentParser()

    @dataclasses.dataclass
    class Sized(Settings):
        size: int | None = setting(None, "80% of free memory")

    Sized.add_arguments(parser)
    Example.add_arguments(parser)
    text = parser.format_help()
    assert "80% of free memory" in text and "placement:" in text and "--disable-thing" in text


@pytest.mark.parametrize("kwargs, message", [
    (dict(page_size=0), "page_size=0 must be a positive integer"),
    (dict(page_size=True), "page_size=True must be an integer"),
    (dict(page_size="16"), "page_size='16' must be an integer"),
    (dict(timeout=-1), "timeout=-1 must be positive"),
    (dict(timeout="1"), "timeout='1' must be a number"),
    (dict(name=3), "name=3 must be a string or None"),
    (dict(policy="nope"), "policy='nope' is not one of"),
    (dict(modules=["q", "z"]), "modules=['q', 'z'] is not one of"),
    (dict(offset=-1), "offset=-1 must be an integer of at least 0"),
    (dict(disable_thing=1), "disable_thing=1 must be True or False"),
    (dict(policy="lpm", disable_thing=True), "policy='lpm' needs the thing"),
])
def test_bad_values_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Example.from_kwargs(**kwargs)


def test_an_unknown_name_is_refused_with_the_nearest_setting():
    with pytest.raises(ValueError, match="'page_sise' is not a setting of this engine; did you mean 'page_size'"):
        Example.from_kwargs(page_sise=4)
    with pytest.raises(ValueError, match="the settings are"):
        Example.from_kwargs(zzz=1)
    assert Example.from_kwargs(timeout=1).timeout == 1  # an int is a number


def test_fields_of_a_base_class():
    @dataclasses.dataclass
    class Server(Example):
        port: int = setting(30000, "port", group="server")

    server = Server(page_size=4, port=1)
    assert server.fields_of(Example) == dataclasses.asdict(Example(page_size=4))
