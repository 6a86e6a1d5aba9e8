"""What the launcher sets in its children's environment, and that a user's own setting wins.

NOTE: read from the launcher's helper, not from /proc/<pid>/environ: setproctitle rewrites the memory
that file shows, so a child's environment cannot be read back from outside.
"""

from __future__ import annotations

from embedserve.launch import set_child_env_defaults


def test_defaults_fill_what_is_unset():
    env: dict[str, str] = {}
    set_child_env_defaults(env)
    assert env == {"TOKENIZERS_PARALLELISM": "false", "GOMP_SPINCOUNT": "10000"}


def test_a_users_settings_win():
    env = {"GOMP_SPINCOUNT": "123", "TOKENIZERS_PARALLELISM": "true"}
    set_child_env_defaults(env)
    assert env == {"GOMP_SPINCOUNT": "123", "TOKENIZERS_PARALLELISM": "true"}
