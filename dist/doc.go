// Package dist holds what an operator installs besides the flanneld binary:
// the systemd unit (flanneld.service) with its example environment file
// (flanneld.default), the docker.service drop-in (docker-flannel.conf),
// mk-docker-opts.sh, which turns subnet.env into Docker daemon options, and
// a sample subnet.env, and kube-flannel.yml, the Kubernetes DaemonSet of
// --kube-subnet-mgr with its RBAC and network config. The repository's Dockerfile builds the container
// image. The package has no Go API: its tests check that these files work,
// against the real daemon where it matters.
package dist
