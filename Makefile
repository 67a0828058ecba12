.PHONY: install test lint bench demo

install:
	pip install torch==2.13.0
	pip install -e ".[dev]"

test:
	python -m pytest -q -n 2

lint:
	ruff check .
	ruff format --check bscale tests benchmarks examples

bench:
	python benchmarks/estimator_accuracy.py
	python benchmarks/overhead.py
	python benchmarks/kernel_bandwidth.py
	python benchmarks/adaptive_batch.py

demo:
	bscale demo
