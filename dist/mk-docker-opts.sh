#!/bin/sh
# mk-docker-opts.sh: turn the subnet file flanneld writes (subnet.env) into
# Docker daemon options, in the format flannel's script of the same name
# writes:
#
#   DOCKER_OPT_BIP="--bip=10.1.74.1/24"
#   DOCKER_OPT_IPMASQ="--ip-masq=true"
#   DOCKER_OPT_MTU="--mtu=1472"
#   DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"
#
# --ip-masq is the inverse of FLANNEL_IPMASQ: when flanneld masquerades
# traffic leaving the overlay, Docker must not masquerade it again. It is left
# out when the subnet file has no FLANNEL_IPMASQ, or with -m.
#
# Differences from flannel's script, on purpose:
# - The subnet file is parsed, never sourced: only KEY=VALUE lines are
#   accepted, FLANNEL_SUBNET and FLANNEL_MTU must be present and every known
#   key must hold a sane value; anything else is an error and nothing is
#   written. Unknown keys (e.g. newer flannel's FLANNEL_IPV6_*) are ignored.
# - Variables already in the environment (DOCKER_OPTS, DOCKER_OPT_*) are not
#   carried into the output, so re-running it (e.g. from ExecStartPre with the
#   previous output loaded as EnvironmentFile) never accumulates options.
# - The output file is replaced atomically (temporary file + mv, mode 0644).

set -u

prog=${0##*/}
subnet_file=/run/flannel/subnet.env
out_file=/run/docker_opts.env
combined_key=DOCKER_OPTS
indiv=no
combined=no
ipmasq_opt=yes

usage() {
	cat <<EOF
Usage: $prog [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]

Generate Docker daemon options from the subnet file flanneld writes.

Options:
  -f FILE  subnet file to read (default /run/flannel/subnet.env)
  -d FILE  Docker environment file to write (default /run/docker_opts.env)
  -i       write each option as its own variable, e.g. DOCKER_OPT_MTU="--mtu=1450"
  -c       write all options in one combined variable (without -i and -c: both)
  -k KEY   name of the combined variable (default DOCKER_OPTS)
  -m       leave out --ip-masq (for Docker versions without it)
  -h       show this help
EOF
}

# die prints one line naming the problem and exits non-zero.
die() {
	printf '%s: %s\n' "$prog" "$*" >&2
	exit 1
}

# usage_error is die for a mistake on the command line.
usage_error() {
	printf '%s: %s (see %s -h)\n' "$prog" "$*" "$prog" >&2
	exit 2
}

# is_uint VALUE MIN MAX: VALUE is a decimal number without leading zeros in
# MIN..MAX.
is_uint() {
	case $1 in
	'' | *[!0-9]* | 0?*) return 1 ;;
	esac
	[ "${#1}" -le 5 ] && [ "$1" -ge "$2" ] && [ "$1" -le "$3" ]
}

# is_ipv4 ADDR: ADDR is a dotted-quad IPv4 address.
is_ipv4() {
	rest=$1.
	count=0
	while [ -n "$rest" ]; do
		octet=${rest%%.*}
		rest=${rest#*.}
		is_uint "$octet" 0 255 || return 1
		count=$((count + 1))
	done
	[ "$count" -eq 4 ]
}

# is_cidr VALUE MIN MAX: VALUE is ADDR/LEN with LEN in MIN..MAX.
is_cidr() {
	case $1 in
	*/*) ;;
	*) return 1 ;;
	esac
	is_ipv4 "${1%/*}" && is_uint "${1#*/}" "$2" "$3"
}

while getopts ':f:d:icmk:h' opt; do
	case $opt in
	f) subnet_file=$OPTARG ;;
	d) out_file=$OPTARG ;;
	i) indiv=yes ;;
	c) combined=yes ;;
	m) ipmasq_opt=no ;;
	k) combined_key=$OPTARG ;;
	h)
		usage
		exit 0
		;;
	:) usage_error "option -$OPTARG needs an argument" ;;
	*) usage_error "unknown option -$OPTARG" ;;
	esac
done
shift $((OPTIND - 1))
[ "$#" -eq 0 ] || usage_error "unexpected argument \"$1\": all input comes from -f"
[ -n "$subnet_file" ] || usage_error "-f needs a file name"
[ -n "$out_file" ] || usage_error "-d needs a file name"
case $combined_key in
'' | [0-9]* | *[!A-Za-z0-9_]*)
	usage_error "-k \"$combined_key\" is not a valid variable name: use letters, digits and _"
	;;
esac
if [ "$indiv" = no ] && [ "$combined" = no ]; then
	indiv=yes
	combined=yes
fi

# Read the subnet file. read without IFS= trims leading and trailing blanks.
[ -e "$subnet_file" ] || die "subnet file $subnet_file does not exist: start flanneld and wait until it has written it, or pass its path with -f"
if [ ! -f "$subnet_file" ] || [ ! -r "$subnet_file" ]; then
	die "subnet file $subnet_file is not a readable file: pass the file flanneld writes with -f"
fi
subnet=
mtu=
ipmasq=
lineno=0
while read -r line || [ -n "$line" ]; do
	lineno=$((lineno + 1))
	case $line in
	'' | '#'*) continue ;;
	[A-Za-z_]*=*) ;;
	*) die "$subnet_file:$lineno: expected KEY=VALUE, found \"$line\": is this a flannel subnet file?" ;;
	esac
	key=${line%%=*}
	value=${line#*=}
	case $key in
	*[!A-Za-z0-9_]*) die "$subnet_file:$lineno: \"$key\" is not a variable name: is this a flannel subnet file?" ;;
	esac
	case $value in
	\"*\" | \'*\')
		value=${value#?}
		value=${value%?}
		;;
	esac
	case $key in
	FLANNEL_NETWORK)
		is_cidr "$value" 1 32 || die "$subnet_file:$lineno: FLANNEL_NETWORK \"$value\" is not an IPv4 network like 10.5.0.0/16"
		;;
	FLANNEL_SUBNET)
		is_cidr "$value" 1 30 || die "$subnet_file:$lineno: FLANNEL_SUBNET \"$value\" is not an IPv4 address with a prefix length 1..30 like 10.5.34.1/24"
		subnet=$value
		;;
	FLANNEL_MTU)
		is_uint "$value" 68 65535 || die "$subnet_file:$lineno: FLANNEL_MTU \"$value\" is not a number in 68..65535"
		mtu=$value
		;;
	FLANNEL_IPMASQ)
		case $value in
		true | false) ipmasq=$value ;;
		*) die "$subnet_file:$lineno: FLANNEL_IPMASQ \"$value\" is neither true nor false" ;;
		esac
		;;
	esac
done <"$subnet_file"
[ -n "$subnet" ] || die "subnet file $subnet_file has no FLANNEL_SUBNET: pass the file flanneld writes with -f"
[ -n "$mtu" ] || die "subnet file $subnet_file has no FLANNEL_MTU: pass the file flanneld writes with -f"

# The options, in the order flannel's script writes them (by variable name).
opt_bip="--bip=$subnet"
opt_ipmasq=
if [ "$ipmasq_opt" = yes ]; then
	case $ipmasq in
	true) opt_ipmasq=--ip-masq=false ;;
	false) opt_ipmasq=--ip-masq=true ;;
	esac
fi
opt_mtu="--mtu=$mtu"

content=
all=
if [ "$indiv" = yes ]; then
	content="${content}DOCKER_OPT_BIP=\"$opt_bip\"
"
	if [ -n "$opt_ipmasq" ]; then
		content="${content}DOCKER_OPT_IPMASQ=\"$opt_ipmasq\"
"
	fi
	content="${content}DOCKER_OPT_MTU=\"$opt_mtu\"
"
fi
if [ "$combined" = yes ]; then
	all=" $opt_bip"
	if [ -n "$opt_ipmasq" ]; then
		all="$all $opt_ipmasq"
	fi
	all="$all $opt_mtu"
	content="${content}${combined_key}=\"$all\"
"
fi

# Replace the output file atomically.
[ ! -d "$out_file" ] || die "output $out_file is a directory: pass a file name with -d"
out_dir=$(dirname -- "$out_file")
[ -d "$out_dir" ] || die "directory $out_dir for the output file does not exist: create it or pass another file with -d"
tmp=$(mktemp "$out_file.XXXXXX" 2>/dev/null) || die "cannot create a temporary file in $out_dir: check that it is writable"
trap 'rm -f -- "$tmp"' EXIT
trap 'exit 1' HUP INT TERM
printf '%s' "$content" >"$tmp" || die "cannot write $tmp: check free space in $out_dir"
chmod 0644 "$tmp" || die "cannot set the mode of $tmp"
mv -f -- "$tmp" "$out_file" || die "cannot rename $tmp to $out_file"
trap - EXIT
exit 0
