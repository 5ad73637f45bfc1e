# The one entry point for developers and CI (.ci/run -> scripts/test.sh -> make ci).
# scripts/test.sh installs the tools these targets use; the targets themselves install nothing.

CARGO ?= cargo
CRD := crds/trackerportpools.trackgate.dev.yaml
GENERATED := crds charts/trackgate deploy/rendered deploy/dashboards deploy/alerts

.PHONY: ci generate drift fmt lint doc test sansio fuzz-smoke deny helm bench

ci: fmt lint doc test drift sansio fuzz-smoke deny helm

# Regenerates every generated file: the CRD, its chart copy, and what deploy/ renders from the chart.
generate:
	$(CARGO) run -q --locked -p trackgate -- crd > $(CRD)
	bash deploy/generate.sh

drift: generate
	@git diff --exit-code -- $(GENERATED) \
	  || { echo "generated files drifted: run 'make generate' and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- $(GENERATED))" \
	  || { git status --porcelain -- $(GENERATED); echo "untracked generated files: run 'make generate' and commit"; exit 1; }

fmt:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

doc:
	RUSTDOCFLAGS=-Dwarnings $(CARGO) doc --workspace --no-deps --locked

# The resilience and e2e tests drive the real binary: build it first (same profile, same target dir).
test:
	$(CARGO) build --locked -p trackgate
	$(CARGO) nextest run --workspace --locked --no-fail-fast
	$(CARGO) test --doc --workspace --locked

# The protocol crate is sans-io: no async runtime and no sockets may reach it (quinn's check).
sansio:
	@! $(CARGO) tree --locked -p trackgate-protocol -e normal --prefix none \
	  | grep -E '^(tokio|mio|socket2|redis|kube|hyper) ' \
	  || { echo "trackgate-protocol depends on an IO crate"; exit 1; }
	@echo "sans-io: trackgate-protocol has no IO dependencies"

fuzz-smoke:
	bash protocol/fuzz/smoke.sh

deny:
	$(CARGO) deny --locked --log-level error check bans licenses sources

helm:
	bash tests/helm/check.sh

bench:
	$(CARGO) bench --locked -p trackgate-protocol --bench decode
	$(CARGO) bench --locked -p trackgate-operator --bench allocate
