# voicebus developer commands. `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv/bin"

# install system packages, the virtualenv and the offline models
setup:
    deploy/dev-setup.sh

# NATS (unless VB_NATS_URL is set) and every stage, until Ctrl-C
up *ARGS:
    {{venv}}/voicebus up {{ARGS}}

# the whole test suite (what CI runs)
test *ARGS:
    {{venv}}/pytest -q {{ARGS}}

# ruff, mypy (strict on proto/ and the runtime), and the generated documents up to date
lint:
    {{venv}}/ruff check .
    {{venv}}/ruff format --check .
    {{venv}}/mypy
    {{venv}}/voicebus proto --check
    {{venv}}/voicebus config --check docs/configuration.md
    {{venv}}/voicebus natsconf --check deploy/k8s/base/nats/nats.conf
    {{venv}}/voicebus natsconf --tls-dir /etc/nats-tls --check deploy/k8s/overlays/prod/nats.conf

# regenerate the contract document proto/asyncapi.json
proto:
    {{venv}}/voicebus proto

# regenerate the configuration table in docs/configuration.md
docs:
    {{venv}}/voicebus config --write docs/configuration.md

# regenerate the NATS server configuration (users and permissions from proto/subjects.py)
deploy-config:
    {{venv}}/voicebus natsconf -o deploy/k8s/base/nats/nats.conf
    {{venv}}/voicebus natsconf --tls-dir /etc/nats-tls -o deploy/k8s/overlays/prod/nats.conf

# benchmarks (medians of runs with ranges) into out/bench/*.json and docs/benchmarks.md
bench *ARGS:
    {{venv}}/python -m tests.bench {{ARGS}}
