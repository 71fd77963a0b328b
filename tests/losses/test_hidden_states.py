"""Tests of speechlm_jax.losses.hidden_states (DiVA's MSE terms) against float64 NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speechlm_jax.losses.hidden_states import embedding_alignment, hidden_state_distillation


@pytest.mark.parametrize("fn", [hidden_state_distillation, embedding_alignment])
def test_hidden_state_losses_match_float64(fn, numpy_ref):
    x = numpy_ref.make_inputs(3)
    student, teacher = jnp.asarray(x["student_hidden"]), jnp.asarray(x["teacher_hidden"])

    def ref(s):
        return numpy_ref.mean_squared_distance(s, numpy_ref.f64(x["teacher_hidden"]), x["mask"], x["weights"])

    value, metrics = fn(student, teacher, x["mask"], weights=x["weights"])
    np.testing.assert_allclose(value, ref(numpy_ref.f64(x["student_hidden"])), rtol=1e-6, atol=1e-6)
    assert -1.0 <= metrics["cosine"] <= 1.0
    grad_student, grad_teacher = jax.grad(lambda s, t: fn(s, t, x["mask"], weights=x["weights"])[0], argnums=(0, 1))(
        student, teacher
    )
    np.testing.assert_allclose(grad_student, numpy_ref.numeric_grad(ref, x["student_hidden"]), atol=1e-5)
    np.testing.assert_array_equal(grad_teacher, 0.0)


def test_gradients_by_finite_differences_float64(numpy_ref):
    numpy_ref.check_float64_gradients(
        lambda a: (lambda s: hidden_state_distillation(s, a["teacher_hidden"], a["mask"])[0], (a["student_hidden"],))
    )
