"""Reward callables, the registry, composition, and the remote client/server.

See :mod:`mmgrpo.rewards.registry` for the API. ``rewards.get(name, **options)`` builds a reward callable.
"""

from mmgrpo.rewards.registry import (
    available,
    check_command_line_options,
    check_reward_options,
    get,
    is_factory,
    register,
    resolve,
)

__all__ = [
    "available",
    "check_command_line_options",
    "check_reward_options",
    "get",
    "is_factory",
    "register",
    "resolve",
]
