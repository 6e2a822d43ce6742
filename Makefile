# The two commands a new user types: `make run` and `make test`. Both set up first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup run test bench clean torture

setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/duplexline serve

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench/run_all.py

# The torture tier at full size (tests/torture; `make test` runs its short counts): needs root
# for its network namespace, and about half an hour; TORTURE_SEED=N replays a run's seed.
torture: setup
	TORTURE_SCALE=full $(PY) -m pytest tests/torture

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
