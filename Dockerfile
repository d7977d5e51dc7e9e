# flanneld container image.
#
#   docker build --build-arg VERSION=$(git describe --tags --always --dirty) -t flanneld .
#
# Run it in the host's network namespace with the capabilities the daemon
# needs (routes, links and iptables; /dev/net/tun for the udp backend) and
# /run/flannel shared with the host, where subnet.env is written:
#
#   docker run -d --name flanneld --network host \
#     --cap-add NET_ADMIN --cap-add NET_RAW --device /dev/net/tun \
#     -v /run/flannel:/run/flannel \
#     flanneld --etcd-endpoints http://10.0.0.11:2379 --iface eth0
#
# mk-docker-opts.sh is in the image too:
#   docker run --rm -v /run:/run --entrypoint /opt/bin/mk-docker-opts.sh flanneld -i

ARG GO_VERSION=1.26.8

# Build a static binary for the target platform on the build platform.
FROM --platform=$BUILDPLATFORM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
ARG TARGETOS
ARG TARGETARCH
RUN CGO_ENABLED=0 GOOS=${TARGETOS} GOARCH=${TARGETARCH} \
    go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/flanneld .

# A small runtime with the iptables and ip tools. Debian's iptables is the
# nft variant; on hosts whose rules are in iptables-legacy, build with
# --build-arg IPTABLES=legacy so the daemon's rules land in the same tables.
FROM debian:bookworm-slim
ARG IPTABLES=nft
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates iproute2 iptables \
 && rm -rf /var/lib/apt/lists/* \
 && update-alternatives --set iptables /usr/sbin/iptables-${IPTABLES} \
 && update-alternatives --set ip6tables /usr/sbin/ip6tables-${IPTABLES}
COPY --from=build /out/flanneld /opt/bin/flanneld
COPY dist/mk-docker-opts.sh /opt/bin/mk-docker-opts.sh
ENTRYPOINT ["/opt/bin/flanneld"]
