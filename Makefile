# lockstock developer tasks. Works as root on a fresh Debian 12 machine
# (`make deps` installs MariaDB and the client headers) and is a no-op
# check when everything is already installed.

SHELL := /bin/sh
CARGO ?= cargo
DEMO ?= flash_sale
APT_PACKAGES := mariadb-server galera-4 rsync libmariadb-dev pkg-config gcc libc6-dev
# Only for `make report` (the Redis-gate row).
REPORT_APT_PACKAGES := redis-server
POLICY_RC_D := /usr/sbin/policy-rc.d
# Warnings fail `make test` (clean on Rust 1.95.0; `make test LINTS=` only reports them, for a
# later toolchain whose clippy brings new lints).
LINTS ?= -D warnings
# A machine that just booted may run unattended-upgrades: wait for dpkg's lock, not fail.
APT_OPTIONS := -o DPkg::Lock::Timeout=600

.PHONY: all deps lint-deps test demo bench report report-deps report-galera package check-leftovers

all: test

deps:
	@if ! command -v dpkg >/dev/null 2>&1; then \
	  echo "note: not a Debian-based system; make sure a MariaDB server (mariadbd, mariadb-install-db), the Galera 4 provider (libgalera_smm.so), rsync, the MariaDB/MySQL client library and pkg-config are installed" >&2; \
	elif dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 && \
	     { command -v mariadbd >/dev/null 2>&1 || test -x /usr/sbin/mariadbd; }; then \
	  : ; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "error: missing packages; as root run 'make deps', or:" >&2; \
	  echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends $(APT_PACKAGES)" >&2; \
	  exit 1; \
	else \
	  set -e; \
	  echo "installing $(APT_PACKAGES)"; \
	  created_policy=; \
	  if [ ! -e $(POLICY_RC_D) ]; then \
	    printf '#!/bin/sh\n# temporary (lockstock make deps): do not start services\nexit 101\n' > $(POLICY_RC_D); \
	    chmod 755 $(POLICY_RC_D); \
	    created_policy=1; \
	  fi; \
	  trap 'if [ -n "$$created_policy" ]; then rm -f $(POLICY_RC_D); fi' EXIT; \
	  trap 'exit 130' INT; trap 'exit 143' TERM; trap 'exit 129' HUP; \
	  apt-get $(APT_OPTIONS) update; \
	  DEBIAN_FRONTEND=noninteractive apt-get $(APT_OPTIONS) install -y --no-install-recommends $(APT_PACKAGES); \
	fi
	@command -v $(CARGO) >/dev/null 2>&1 || { \
	  echo "error: cargo not found; install Rust (>= 1.95 for the committed Cargo.lock) from https://rustup.rs and make sure ~/.cargo/bin is on PATH" >&2; \
	  exit 1; }

# Only `make test` formats and lints: `make demo` needs neither rustfmt nor clippy.
lint-deps: deps
	@for c in fmt clippy; do \
	  if ! $(CARGO) $$c --version >/dev/null 2>&1; then \
	    if [ $$c = fmt ]; then comp=rustfmt; else comp=clippy; fi; \
	    if command -v rustup >/dev/null 2>&1; then \
	      rustup component add $$comp || exit 1; \
	    else \
	      echo "error: 'cargo $$c' is not available and rustup is not installed; install the $$comp component" >&2; \
	      exit 1; \
	    fi; \
	  fi; \
	done

test: lint-deps
	@mkdir -p target && sh .ci/check-leftovers --list > $(LEFTOVER_BASELINE)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- $(LINTS)
	# --all-targets builds the benchmarks and runs each once against a real server (criterion's
	# test mode); a release build of them (`cargo bench --no-run`) added ~3 minutes and checked
	# nothing more.
	$(CARGO) test --workspace --all-targets
	$(CARGO) test --workspace --doc
	RUSTDOCFLAGS="$(LINTS)" $(CARGO) doc --workspace --no-deps --all-features
	@sh .ci/check-leftovers $(LEFTOVER_BASELINE)

# Sandboxes, Galera clusters and Redis servers must not outlive the processes that started
# them (see .ci/check-leftovers): `make test` checks after its run, against what was there
# before it; both leave out what live processes (a `make demo` beside it) own.
LEFTOVER_BASELINE := target/leftover-baseline

check-leftovers:
	@sh .ci/check-leftovers

demo: deps
	$(CARGO) run --release --example $(DEMO)

bench: deps
	$(CARGO) bench

# The Redis-gate row of the report needs redis-server (installed here only: `make test`
# does not need Redis; without it the report prints that the row was skipped).
report: deps report-deps
	$(CARGO) run --release --example contention_report

report-deps:
	@if ! command -v dpkg >/dev/null 2>&1; then \
	  command -v redis-server >/dev/null 2>&1 || \
	    echo "note: not a Debian-based system; install redis-server for the report's Redis-gate row" >&2; \
	elif dpkg -s $(REPORT_APT_PACKAGES) >/dev/null 2>&1; then \
	  : ; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "note: redis-server is missing, the report skips its Redis-gate row; as root run 'make report', or:" >&2; \
	  echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends $(REPORT_APT_PACKAGES)" >&2; \
	else \
	  set -e; \
	  echo "installing $(REPORT_APT_PACKAGES)"; \
	  created_policy=; \
	  if [ ! -e $(POLICY_RC_D) ]; then \
	    printf '#!/bin/sh\n# temporary (lockstock make report): do not start services\nexit 101\n' > $(POLICY_RC_D); \
	    chmod 755 $(POLICY_RC_D); \
	    created_policy=1; \
	  fi; \
	  trap 'if [ -n "$$created_policy" ]; then rm -f $(POLICY_RC_D); fi' EXIT; \
	  trap 'exit 130' INT; trap 'exit 143' TERM; trap 'exit 129' HUP; \
	  apt-get $(APT_OPTIONS) update; \
	  DEBIAN_FRONTEND=noninteractive apt-get $(APT_OPTIONS) install -y --no-install-recommends $(REPORT_APT_PACKAGES); \
	fi

# The contention report on a throwaway 3-node Galera cluster (about 3 minutes).
report-galera: deps
	$(CARGO) run --release --example contention_report -- --galera

# Both crates as they would be published (lockstock-testkit verified against the packaged lockstock).
package: deps
	$(CARGO) package --workspace
