"""The suite's schedule: conftest's longest-first module order reaches the xdist workers."""

import pathlib
import re

import conftest

TESTS = pathlib.Path(__file__).parent


def test_every_module_of_the_longest_first_order_exists_once():
  """A renamed or removed module would silently fall to the end of the run."""
  names = conftest._LONGEST_FIRST  # pylint: disable=protected-access
  assert len(set(names)) == len(names)
  missing = [name for name in names if not (TESTS / f"{name}.py").is_file()]
  assert not missing, missing


def test_make_test_keeps_the_collection_order_of_its_modules():
  """`--dist loadscope` with xdist's default reorder sorts modules by their number of tests, which
  threw conftest's order away (test_survive started 132 s into the run)."""
  makefile = (TESTS.parent / "Makefile").read_text()
  command = re.search(r"^test:.*\n\t(.*)$", makefile, re.M).group(1)
  assert "--dist loadscope" in command and "--no-loadscope-reorder" in command, command
