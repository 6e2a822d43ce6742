# The two commands a new user types: `make run` and `make test`. Both set up first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup run test bench clean torture demo-model

setup:
	@bash scripts/setup.sh

# The demo model (models/demo, trained by `make demo-model`) when it is there, else a
# random one built at start-up.
DEMO_MODEL := $(if $(wildcard models/demo/config.json),--model models/demo)

run: setup
	$(VENV)/bin/duplexline serve $(DEMO_MODEL)

# The tests run the SIP end-to-end suite on both SIP stacks: the optional pjsua2 one too.
test:
	@EXTRAS=test,pjsua2 bash scripts/setup.sh
	$(PY) -m pytest

bench: setup
	$(PY) bench/run_all.py

# The torture tier at full size (tests/torture; `make test` runs its short counts): needs root
# for its network namespace, and about half an hour; TORTURE_SEED=N replays a run's seed.
torture: setup
	TORTURE_SCALE=full $(PY) -m pytest tests/torture

# Train the demo model on this machine's CPU (about 15 minutes on 2 cores; docs/training.md).
demo-model: setup
	bash scripts/demo_model.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
