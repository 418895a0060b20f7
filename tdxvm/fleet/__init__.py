"""Fleets: many attested VMs across libvirt hosts, from one YAML file (``tdxvm apply -f``).

:mod:`~tdxvm.fleet.spec` (the file), :mod:`~tdxvm.fleet.inventory` (what exists),
:mod:`~tdxvm.fleet.plan` (the difference, pure), :mod:`~tdxvm.fleet.planner` (reads
what a plan needs), :mod:`~tdxvm.fleet.state` (state file, lock),
:mod:`~tdxvm.fleet.reconcile` (apply, destroy), :mod:`~tdxvm.fleet.outcome` (events,
outcomes, reports), :mod:`~tdxvm.fleet.report` (status, text).
"""
