#!/bin/sh
# The edge's dispatcher list from DNS, for Kubernetes (deploy/k8s/kamailio.yaml runs it beside
# Kamailio): every IPv4 address of $BRIDGE_SERVICE (a headless Service: one A record per
# ready bridge pod, which is its node's address: the bridges use the node's network) becomes
# a destination on $BRIDGE_PORT. When the list changed, it is written atomically and Kamailio
# reloads it (calls in progress are not touched). An empty answer (DNS down, no bridge ready
# for a moment) keeps the last list: the OPTIONS probes take dead bridges out anyway.
#
#   BRIDGE_SERVICE  e.g. duplexline-bridge-sip.duplexline.svc.cluster.local (required)
#   BRIDGE_PORT     the bridges' SIP port (5060)
#   DISPATCHER_LIST the file kamailio.cfg reads (/run/kamailio/dispatcher.list)
#   CTL_SOCKET      Kamailio's control socket (unix:/run/kamailio/kamailio_ctl)
#   INTERVAL        seconds between lookups (10)
# With --once: write the list once and exit (non-zero when DNS gave no address).
set -eu
: "${BRIDGE_SERVICE:?set BRIDGE_SERVICE to the bridges' headless Service name}"
port=${BRIDGE_PORT:-5060}
list=${DISPATCHER_LIST:-/run/kamailio/dispatcher.list}
ctl=${CTL_SOCKET:-unix:/run/kamailio/kamailio_ctl}

render() {
    getent ahostsv4 "$BRIDGE_SERVICE" 2>/dev/null | awk '{print $1}' | sort -u \
        | awk -v port="$port" '{printf "1 sip:%s:%s 0 0 duid=%s\n", $1, port, $1}' > "$list.new" || true
    if [ ! -s "$list.new" ]; then
        rm -f "$list.new"
        return 1
    fi
    if cmp -s "$list.new" "$list"; then
        rm -f "$list.new"
        return 0
    fi
    mv "$list.new" "$list"
    echo "dispatcher-dns: $(wc -l < "$list") bridges: $(awk '{print $2}' "$list" | tr '\n' ' ')"
    # Before Kamailio is up this fails: it reads the file when it starts.
    kamcmd -s "$ctl" dispatcher.reload >/dev/null 2>&1 || true
}

if [ "${1:-}" = "--once" ]; then
    render
    exit
fi
while :; do
    render || echo "dispatcher-dns: no address for $BRIDGE_SERVICE; keeping the last list" >&2
    sleep "${INTERVAL:-10}"
done
