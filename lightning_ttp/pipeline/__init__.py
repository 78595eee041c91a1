"""The prediction pipeline: from a run's settings to its predicted loss curve (pure torch/numpy/scipy, no Lightning).

It stands on the math layers (:mod:`lightning_ttp.kernel`, :mod:`lightning_ttp.dynamics`) and is
called by :func:`lightning_ttp.predict_training_time` (through :mod:`lightning_ttp.api`) and by the
Lightning callbacks (:mod:`lightning_ttp.callbacks`) alike. Its modules, in the order they run:

At fit start (:mod:`~lightning_ttp.pipeline.predict`: :func:`~lightning_ttp.pipeline.predict.predict_run`
runs steps 1–6):

1. :mod:`~lightning_ttp.pipeline.plan` (with :mod:`~lightning_ttp.pipeline.schedules`): the plan of
   the run — steps, effective batch, per-step lr/momentum per param group;
2. :mod:`~lightning_ttp.pipeline.data`: the fixed, seeded kernel subset (and the batch helpers);
3. :mod:`~lightning_ttp.pipeline.budget`: the kernel's size and kind chosen to fit the cost cap;
4. :mod:`~lightning_ttp.pipeline.estimate` (with :mod:`~lightning_ttp.pipeline.outputs` and
   :mod:`~lightning_ttp.pipeline.batch_statistics`): f0 and the empirical NTK at w0;
5. :mod:`~lightning_ttp.pipeline.simulate`: the function-space simulation of the plan, giving a
   :mod:`~lightning_ttp.pipeline.prediction` (curves, band, steps to converge, diagnostics);
6. :mod:`~lightning_ttp.pipeline.lookahead`: a few real steps on the subset, re-linearised there,
   joined to the open-loop prediction.

While training runs (the callbacks call them):

7. :mod:`~lightning_ttp.pipeline.refine`: the curve refitted to the observed losses;
8. :mod:`~lightning_ttp.pipeline.closed_loop`: the closed loop, one module per job, run in order by
   its ``loop``: ``state`` (the kernel re-estimated at the current weights, the optimiser state
   in function space), ``drift`` (against the fit-start kernel), ``continuation`` (what the
   simulation of the rest of the run from f_t runs on), ``blend`` (joined to the observed losses,
   calibrated, blended with a power law);
9. :mod:`~lightning_ttp.pipeline.run_state`: the state the callback keeps across a checkpoint, and
   what it reads off it between hooks (the current curve and its refit, the ETA, the refit steps);
10. :mod:`~lightning_ttp.pipeline.give_up_state`: the same for :class:`~lightning_ttp.callbacks.EarlyGiveUp`
    (its state, the window of spectra, a round's history entry and metrics, the round's decision).

The modules import each other and the math layers, never the callbacks, the reports or Lightning;
``tests/test_architecture.py`` checks that no import goes up a layer or around a loop
(``docs/architecture.md``).
"""
