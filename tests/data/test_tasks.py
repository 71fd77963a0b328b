"""The task registry and prompt pools."""

from __future__ import annotations

import pytest

from speechlm_jax.data.tasks import TASKS, TextTask, get_task, register_task


def test_builtin_tasks_have_disjoint_prompt_splits():
    for name in ("asr", "continuation", "spoken_qa"):
        task = get_task(name)
        assert task.prompts("train") and task.prompts("heldout")
        assert not set(task.prompts("train")) & set(task.prompts("heldout"))
    assert get_task("asr").answer("a b c") == "a b c"


def test_register_validates_and_is_idempotent():
    task = TextTask("test_upper", ("Upper-case: {content}",), ("Shout {content}",), answer=str.upper)
    assert register_task(task) is task and register_task(task) is task
    assert TASKS["test_upper"].answer("hi") == "HI"
    with pytest.raises(ValueError, match="already registered"):
        register_task(TextTask("test_upper", ("Again {content}",), ("x {content}",)))
    register_task(TextTask("test_upper", ("Again {content}",), ("x {content}",)), replace=True)
    with pytest.raises(ValueError, match="content"):
        TextTask("bad", ("no placeholder",), ("{content}",))
    with pytest.raises(ValueError, match="both splits"):
        TextTask("bad", ("{content}",), ("{content}",))
    with pytest.raises(ValueError, match="split"):
        task.prompts("test")
    with pytest.raises(KeyError):
        get_task("no_such_task")
    del TASKS["test_upper"]
