"""Counting a jaxpr's equations, sub-jaxprs (scan, while, cond, pjit, custom
vjp bodies) included: the tests that prove a computation is not unrolled
over classes, prototypes or iterations compare these counts."""

import jax
import jax.extend.core as jex


def count_eqns(jaxpr) -> int:
    """Equations in `jaxpr` (a Jaxpr or ClosedJaxpr) and in every jaxpr
    nested in its equations' parameters."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for sub in jex.jaxprs_in_params(eqn.params):
            n += count_eqns(sub)
    return n


def traced_eqns(fn, *args) -> int:
    """`count_eqns` of `jax.make_jaxpr(fn)(*args)`, traced twice: a
    process's first trace of some jnp helpers adds a few one-time equations
    (measured: 371 then 368 for the same GradCAM), which would make a
    comparison depend on the order the tests run in."""
    jax.make_jaxpr(lambda *a: fn(*a))(*args)
    # A new wrapper: make_jaxpr caches per function object.
    return count_eqns(jax.make_jaxpr(lambda *a: fn(*a))(*args))
