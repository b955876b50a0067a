#!/usr/bin/env bash
# Checks docker-compose.yml as `docker compose config -q` does, and that the Grafana
# dashboard is valid JSON. Needs no Docker engine.
#
# The validator: `docker compose` when the Compose plugin is installed; otherwise a
# small Go program that loads the file with compose-go, the library Docker Compose
# itself loads and validates files with (the version Compose v5.6.0 uses): the same
# schema, interpolation, merge keys and consistency checks (undefined services,
# depends_on conditions, durations...). It is built once from the Go module proxy into
# $TALLY_SERVICES_DIR/tools (about 30 s on a 2-core machine with an empty Go cache,
# instant afterwards).
#
#   scripts/check-compose.sh            # exit 0 when everything is valid
set -euo pipefail
cd "$(dirname "$0")/.."

COMPOSE_GO_VERSION="v2.16.1"
tools="${TALLY_SERVICES_DIR:-.services}/tools"
checker="$tools/compose-check-$COMPOSE_GO_VERSION"

build_checker() {
    if ! command -v go > /dev/null; then
        echo "check-compose: neither 'docker compose' nor Go is installed; install one of them" >&2
        exit 2
    fi
    local src
    src="$(mktemp -d)"
    cat > "$src/go.mod" <<EOF
module tally.invalid/compose-check

go 1.24

require (
	github.com/compose-spec/compose-go/v2 $COMPOSE_GO_VERSION
	go.yaml.in/yaml/v3 v3.0.6 // indirect: imported without a requirement upstream
)
EOF
    cat > "$src/main.go" <<'EOF'
// compose-check FILE...: loads a Compose project the way `docker compose config`
// does (environment, .env beside the file, interpolation, schema, normalisation and
// consistency checks) and exits 1 with the loader's message when it is invalid.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	options, err := cli.NewProjectOptions(os.Args[1:],
		cli.WithOsEnv, cli.WithDotEnv, cli.WithConfigFileEnv, cli.WithDefaultConfigPath)
	if err == nil {
		_, err = options.LoadProject(context.Background())
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
EOF
    echo "check-compose: building the validator (compose-go $COMPOSE_GO_VERSION) into $tools" >&2
    mkdir -p "$tools"
    (cd "$src" && GOFLAGS=-mod=mod go mod tidy && go build -buildvcs=false -o compose-check .)
    mv "$src/compose-check" "$checker"
    rm -rf "$src"
}

if docker compose version > /dev/null 2>&1; then
    echo "check-compose: $(docker compose version)"
    docker compose -f docker-compose.yml config -q
else
    [ -x "$checker" ] || build_checker
    echo "check-compose: compose-go $COMPOSE_GO_VERSION loader (no 'docker compose' here)"
    "$checker" docker-compose.yml
fi
echo "check-compose: docker-compose.yml is valid"

python3 -m json.tool deploy/grafana/dashboards/tally-pipeline.json > /dev/null
echo "check-compose: deploy/grafana/dashboards/tally-pipeline.json is valid JSON"

# Prometheus's configuration as compose mounts it (its rule file path is the
# container's, so syntax only; the rules themselves are checked by promtool test rules).
if command -v promtool > /dev/null; then
    promtool check config --syntax-only deploy/compose/prometheus.yml > /dev/null
    echo "check-compose: deploy/compose/prometheus.yml is valid Prometheus configuration"
fi
