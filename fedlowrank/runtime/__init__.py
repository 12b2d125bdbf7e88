"""How a federated run executes: Flower's simulation runtime on a private SuperLink (default,
:mod:`.superlink`), the deprecated in-process ``run_simulation`` (:mod:`.runner`), a Ray-free in-process loop
for tests and benchmarks (:mod:`.inprocess`), process supervision (:mod:`.reaper`) and log forwarding
(:mod:`.logs`). Deployment extras (warm executors, fast-polling nodes, node cache) live in
:mod:`fedlowrank.deploy`; nothing here imports them."""
