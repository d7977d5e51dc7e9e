# flanneld — see README.md. Targets run from a clean clone; demo, bench and
# the e2e part of test need root (network namespaces).
GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)
BIN     := bin/flanneld
BACKEND ?= host-gw
KEEP    ?=
IMAGE   ?= flanneld:$(VERSION)
FUZZTIME ?= 30s

.PHONY: all build test vet lint demo bench fuzz image install clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) .

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt would change: $$out"; exit 1; fi
	$(GO) vet ./...

# The whole suite: unit tests, integration tests against an embedded etcd
# and a real kube-apiserver (built first, once, into ~/.cache/flanneld-test),
# and (as root) the namespaced e2e tests; then the arm64 cross build.
test: lint
	$(GO) test -count=1 -timeout 15m -run '^TestBinary$$' ./internal/kubetest/
	$(GO) test -race -count=1 -timeout 25m ./...
	GOARCH=arm64 CGO_ENABLED=0 $(GO) build -o /dev/null .

demo: build
	$(GO) run ./cmd/flannel-lab -flanneld $(BIN) -backend $(BACKEND) $(if $(KEEP),-keep,)

bench: build
	$(GO) test -run '^$$' -bench . -benchmem -timeout 30m ./...

# Each fuzz target for FUZZTIME (go test -fuzz takes one target at a time);
# seed corpora live in testdata/fuzz/ and run as plain tests in `make test`.
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParseKey$$' -fuzztime $(FUZZTIME) ./pkg/ip/
	$(GO) test -run '^$$' -fuzz '^FuzzParseLeaseKey$$' -fuzztime $(FUZZTIME) ./pkg/ip/
	$(GO) test -run '^$$' -fuzz '^FuzzParseConfig$$' -fuzztime $(FUZZTIME) ./subnet/
	$(GO) test -run '^$$' -fuzz '^FuzzParseLeaseAttrs$$' -fuzztime $(FUZZTIME) ./subnet/
	$(GO) test -run '^$$' -fuzz '^FuzzParseEnv$$' -fuzztime $(FUZZTIME) ./subnet/
	$(GO) test -run '^$$' -fuzz '^FuzzReceive$$' -fuzztime $(FUZZTIME) ./backend/udp/
	$(GO) test -run '^$$' -fuzz '^FuzzOutbound$$' -fuzztime $(FUZZTIME) ./backend/udp/

# Needs a Docker engine (none in CI; TestDockerfile checks the file there).
image:
	docker build --build-arg VERSION=$(VERSION) -t $(IMAGE) .

install: build
	install -D -m 0755 $(BIN) $(DESTDIR)/usr/local/bin/flanneld
	install -D -m 0755 dist/mk-docker-opts.sh $(DESTDIR)/usr/local/bin/mk-docker-opts.sh
	install -D -m 0644 dist/flanneld.service $(DESTDIR)/etc/systemd/system/flanneld.service
	install -D -m 0644 dist/docker-flannel.conf $(DESTDIR)/etc/systemd/system/docker.service.d/flannel.conf
	test -e $(DESTDIR)/etc/default/flanneld || install -D -m 0644 dist/flanneld.default $(DESTDIR)/etc/default/flanneld

clean:
	rm -rf bin
