#!/usr/bin/env bash
# `make demo`: run the agent on the example manifests and show what it serves.
set -euo pipefail
cd "$(dirname "$0")/.."
KPR=.venv/bin/kpr
CFG=examples/demo.yaml
LOG=/run/kpr-demo/agent.log
mkdir -p /run/kpr-demo

# A virtual cluster first: the test API server, kubectl, and an agent per node namespace
# watching it (scripts/demo_cluster.py removes everything it made before it returns).
echo "==== kpr in a cluster: source.kind kubernetes"
.venv/bin/python scripts/demo_cluster.py
echo
echo "==== kpr on bare metal: source.kind files (examples/manifests), and one vignette per plugin"

$KPR check-config --config $CFG
$KPR run --config $CFG 2>"$LOG" &
agent=$!
# Everything the demo makes is undone on exit, whatever happens (helpers appended below).
cleanup_demo() {
  kill -TERM $agent 2>/dev/null; wait $agent 2>/dev/null || true
  if declare -F socklb_cleanup >/dev/null; then socklb_cleanup; fi
}
trap cleanup_demo EXIT
trap 'exit 130' INT TERM   # so the EXIT trap runs on Ctrl-C and kill too

for _ in $(seq 1 100); do
  if $KPR status --config $CFG --json 2>/dev/null | grep -q '"ready": true'; then break; fi
  kill -0 $agent 2>/dev/null || { echo "the agent exited; its log:"; cat "$LOG"; exit 1; }
  sleep 0.1
done

echo
echo "== kpr plugins"
$KPR plugins --config $CFG
echo
echo "== kpr status"
$KPR status --config $CFG || true
echo
echo "== kpr service list"
$KPR service list --config $CFG
echo
echo "(agent log: $LOG)"

# ---------------------------------------------------------------------------------------
# socklb: a ClusterIP reached from a pod namespace. A second agent runs inside a "node"
# namespace with two backend pods and a client pod (veths only between namespaces this
# script makes), on a private bpffs and a child cgroup; nothing touches the machine's own
# interfaces, routes or root cgroup.
SCFG=examples/demo-socklb.yaml
SLOG=/run/kpr-demo/socklb-agent.log
P=kprdemo$$                                  # namespace prefix, unique per run
BPFFS=/run/kpr-demo/bpffs
CGMNT=/run/kpr-demo/cgroup
CG=$CGMNT/kpr-demo
sagent=""

socklb_cleanup() {
  [ -n "$sagent" ] && { kill -TERM "$sagent" 2>/dev/null; wait "$sagent" 2>/dev/null || true; }
  if mountpoint -q "$BPFFS"; then $KPR cleanup --config $SCFG >/dev/null 2>&1 || true; fi
  for n in client be1 be2 node; do
    if ip netns list | grep -qw "$P-$n"; then
      for pid in $(ip netns pids "$P-$n" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
      ip netns del "$P-$n" 2>/dev/null || true
    fi
  done
  if [ -d "$CG" ]; then
    [ -e "$CG/cgroup.kill" ] && echo 1 > "$CG/cgroup.kill" 2>/dev/null
    for _ in $(seq 1 50); do rmdir "$CG" 2>/dev/null && break; sleep 0.1; done
  fi
  mountpoint -q "$CGMNT" && umount "$CGMNT"
  mountpoint -q "$BPFFS" && umount "$BPFFS"
  rmdir "$CGMNT" "$BPFFS" 2>/dev/null || true
  rm -rf /run/kpr-demo/socklb-allocations.json /run/kpr-demo/socklb-state   # the log stays, for reading
}

# The pods' server: answers every HTTP request with its name.
SERVER='import http.server, sys
name = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {name}\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()'
# The client: an HTTP GET, and what getpeername() says about the connection.
CLIENT='import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=3)
s.sendall(b"GET / HTTP/1.0\r\nHost: echo\r\n\r\n")
body = b""
while (c := s.recv(4096)): body += c
answer = body.split(b"\r\n\r\n", 1)[1].decode().strip()
host, port = s.getpeername()[:2]
print(f"{answer}  (getpeername: {host}:{port})")'

mkdir -p "$BPFFS" "$CGMNT"
mount -t bpf bpf "$BPFFS"
mount -t cgroup2 none "$CGMNT"                # a view of the cgroup v2 hierarchy
mkdir "$CG"
for n in node be1 be2 client; do ip netns add "$P-$n"; ip -n "$P-$n" link set lo up; done
ip netns exec "$P-node" sysctl -qw net.ipv4.ip_forward=1
ip -n "$P-node" addr add 10.77.100.1/32 dev lo
for pod in be1:10.244.100.11 be2:10.244.100.12 client:10.244.100.100; do
  name=${pod%%:*}; addr=${pod#*:}
  ip -n "$P-node" link add "lxc$name" type veth peer name eth0 netns "$P-$name"
  ip -n "$P-node" addr add 169.254.1.1/32 dev "lxc$name"
  ip -n "$P-node" link set "lxc$name" up
  ip -n "$P-node" route add "$addr/32" dev "lxc$name"
  ip -n "$P-$name" addr add "$addr/32" dev eth0
  ip -n "$P-$name" link set eth0 up
  ip -n "$P-$name" route add 169.254.1.1 dev eth0 scope link
  ip -n "$P-$name" route add default via 169.254.1.1 dev eth0
done
# In a subshell, so they are not this shell's jobs; socklb_cleanup kills them by namespace.
for b in be1 be2; do (ip netns exec "$P-$b" python3 -c "$SERVER" "$b" >/dev/null 2>&1 &); done

$KPR check-config --config $SCFG
ip netns exec "$P-node" $KPR run --config $SCFG 2>"$SLOG" &
sagent=$!
for _ in $(seq 1 100); do
  if $KPR status --config $SCFG --json 2>/dev/null | grep -q '"ready": true'; then break; fi
  kill -0 $sagent 2>/dev/null || { echo "the socklb agent exited; its log:"; cat "$SLOG"; exit 1; }
  sleep 0.1
done

# A process joins the cgroup first, then enters the pod's namespace (ip netns exec remounts /sys).
in_pod() { sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$CG" ip netns exec "$P-client" "$@"; }

echo
echo "== socklb: the ClusterIP 10.96.100.10:80 from pod 10.244.100.100 (backends: be1, be2 on :8080)"
for i in 1 2 3 4 5 6; do
  printf 'request %d: ' "$i"
  in_pod python3 -c "$CLIENT" 10.96.100.10 || echo "(failed)"
done
echo
echo "== kpr status (socklb agent)"
$KPR status --config $SCFG || true
echo
echo "(socklb agent log: $SLOG)"

# ---------------------------------------------------------------------------------------
# announce_bgp: the demo agent announces the LoadBalancer IP 10.0.100.10 (30-loadbalancer.yaml:
# externalTrafficPolicy Local, with a ready endpoint on node1) over BGP. Its ExaBGP runs in the
# namespace kpr-demo-bgp (plugins.announce_bgp.netns in examples/demo.yaml: the agent waits for
# it), linked by a veth to a router namespace running bird2. Only those two namespaces and
# /run/kpr-demo/bgp are made here; the machine's own interfaces and routes are not touched.
BGPNS=kpr-demo-bgp
BGPRTR=kprdemo$$-bgprtr                      # unique per run
BGPDIR=/run/kpr-demo/bgp
bgp_made=""

bgp_cleanup() {
  [ -n "$bgp_made" ] || return 0
  for ns in "$BGPRTR" "$BGPNS" "$BGPNS.tmp$$"; do
    if ip netns list | grep -qw "$ns"; then
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
  rm -rf "$BGPDIR"
}
# Chain onto the demo's cleanup: the agent stops first (its ExaBGP with it), then our namespaces.
eval "$(declare -f cleanup_demo | sed '1s/^cleanup_demo/bgp_prev_cleanup_demo/')"
cleanup_demo() { bgp_prev_cleanup_demo; bgp_cleanup; }

echo
if ip netns list | grep -qw "$BGPNS"; then
  echo "== announce_bgp: skipped, the namespace $BGPNS already exists (another demo running?)"
else
  bgp_made=yes
  mkdir -p "$BGPDIR"
  ip netns add "$BGPRTR"
  ip -n "$BGPRTR" link set lo up
  # The router namespace is complete before the node side appears, so ExaBGP (which starts
  # as soon as kpr-demo-bgp exists) finds its peer at once.
  ip netns add "$BGPNS.tmp$$"
  ip -n "$BGPNS.tmp$$" link set lo up
  ip -n "$BGPRTR" link add bgp0 type veth peer name bgp0 netns "$BGPNS.tmp$$"
  ip -n "$BGPRTR" addr add 10.255.0.2/30 dev bgp0
  ip -n "$BGPRTR" link set bgp0 up
  ip -n "$BGPNS.tmp$$" addr add 10.255.0.1/30 dev bgp0
  ip -n "$BGPNS.tmp$$" link set bgp0 up
  cat > "$BGPDIR/bird.conf" <<'BIRD'
router id 10.255.0.2;
protocol device {}
protocol bgp node1 {
  local 10.255.0.2 as 64500;
  neighbor 10.255.0.1 as 64512;
  hold time 9;
  passive on;                  # ExaBGP connects; it does not listen
  error wait time 1, 5;
  ipv4 { import all; export none; };
}
BIRD
  bird -p -c "$BGPDIR/bird.conf"
  # In a subshell, so it is not this shell's job; bgp_cleanup kills it by namespace.
  (ip netns exec "$BGPRTR" bird -f -c "$BGPDIR/bird.conf" -s "$BGPDIR/bird.ctl" >"$BGPDIR/bird.log" 2>&1 &)
  # Give the finished namespace its real name (iproute2 has no `netns rename`; a name is a
  # bind mount under /run/netns, which is what `ip netns add` makes too).
  touch "/run/netns/$BGPNS"
  mount --bind "/run/netns/$BGPNS.tmp$$" "/run/netns/$BGPNS"
  ip netns del "$BGPNS.tmp$$"
  learned=""
  for _ in $(seq 1 150); do
    if birdc -s "$BGPDIR/bird.ctl" show route 10.0.100.10/32 2>/dev/null | grep -q '10.0.100.10/32'; then learned=yes; break; fi
    sleep 0.1
  done
  echo "== announce_bgp: bird2 in $BGPRTR peers with the agent's ExaBGP in $BGPNS"
  birdc -s "$BGPDIR/bird.ctl" show protocols node1 | tail -n +2
  echo
  echo "== birdc show route all (the LoadBalancer IP, next hop the node's address 10.255.0.1)"
  birdc -s "$BGPDIR/bird.ctl" show route all | tail -n +2
  [ -n "$learned" ] || echo "(bird did not learn 10.0.100.10/32 within 15 s; agent log: $LOG)"
  echo
  echo "== kpr status (announce_bgp)"
  $KPR status --config $CFG 2>/dev/null | sed -n '/^plugin announce_bgp/,/^plugin /p' | grep -v '^plugin [^a]' || true
fi

# ---------------------------------------------------------------------------------------
# announce_arp: a router resolves the LoadBalancer IP 10.0.100.10 to the node's MAC over ARP.
# A third agent runs inside a demo "node" namespace whose eth0 is a veth to a "router"
# namespace (examples/demo-announce-arp.yaml); the router reaches 10.0.100.0/24 on-link, so it
# ARPs for the VIP itself. Nothing is sent on, or changed in, the machine's own interfaces.
ARPCFG=examples/demo-announce-arp.yaml
ARPLOG=/run/kpr-demo/arp-agent.log
ARPN=kprdemo$$-arpnode                       # unique per run
ARPR=kprdemo$$-arprtr
arpagent=""

arp_cleanup() {
  [ -n "$arpagent" ] && { kill -TERM "$arpagent" 2>/dev/null; wait "$arpagent" 2>/dev/null || true; }
  for ns in "$ARPN" "$ARPR"; do
    if ip netns list | grep -qw "$ns"; then
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
  rm -rf /run/kpr-demo/arp-allocations.json /run/kpr-demo/arp-state   # the log stays, for reading
}
eval "$(declare -f cleanup_demo | sed '1s/^cleanup_demo/arp_prev_cleanup_demo/')"
cleanup_demo() { arp_prev_cleanup_demo; arp_cleanup; }

for ns in "$ARPN" "$ARPR"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n "$ARPN" link add eth0 type veth peer name eth0 netns "$ARPR"
ip -n "$ARPN" addr add 10.0.0.1/24 dev eth0
ip -n "$ARPN" link set eth0 up
ip -n "$ARPN" route add default via 10.0.0.254    # a forwarding node whose default route
ip netns exec "$ARPN" sysctl -qw net.ipv4.ip_forward=1   # leads back to the router: the loop case
ip -n "$ARPR" addr add 10.0.0.254/24 dev eth0
ip -n "$ARPR" link set eth0 up
ip -n "$ARPR" route add 10.0.100.0/24 dev eth0
node_mac=$(ip -n "$ARPN" -br link show eth0 | awk '{print $3}')

$KPR check-config --config $ARPCFG
ip netns exec "$ARPN" $KPR run --config $ARPCFG 2>"$ARPLOG" &
arpagent=$!
announced=""
for _ in $(seq 1 100); do
  if $KPR status --config $ARPCFG --json 2>/dev/null | grep -q '"10.0.100.10"'; then announced=yes; break; fi
  kill -0 $arpagent 2>/dev/null || { echo "the announce_arp agent exited; its log:"; cat "$ARPLOG"; exit 1; }
  sleep 0.1
done
sleep 0.3   # the responder's socket is open by now; give it a moment after the first claim

echo
echo "== announce_arp: the node namespace $ARPN (eth0 $node_mac) announces 10.0.100.10"
ip netns exec "$ARPR" arping -c 2 -W 0.3 -w 3 -i eth0 10.0.100.10 || true
# The router's own resolution, and traffic the node has no service for: without the drop
# table the node would route it back to the router, and round it would go.
ip netns exec "$ARPR" ping -c 2 -i 0.2 -W 1 10.0.100.10 >/dev/null 2>&1 || true
echo
echo "== ip neigh show 10.0.100.10 (in the router namespace $ARPR)"
ip -n "$ARPR" neigh show 10.0.100.10
echo
echo "== nft list table inet kpr_announce_arp (in the node namespace: forwarded VIP traffic is dropped)"
ip netns exec "$ARPN" nft list table inet kpr_announce_arp
echo
echo "== kpr status (announce_arp agent)"
$KPR status --config $ARPCFG 2>/dev/null | sed -n '/^plugin announce_arp/,$p' || true
[ -n "$announced" ] || echo "(the agent did not announce 10.0.100.10 within 10 s; its log: $ARPLOG)"
echo
echo "(announce_arp agent log: $ARPLOG)"

# ---------------------------------------------------------------------------------------
# tc_nodeport: an external client reaches a NodePort (a pod on node1) and LoadBalancer IPs
# (a pod on node2, by SNAT and by DSR) through the tc programs of two kpr agents, one in each
# node namespace. Client -- router -- node1 / node2, each node with one pod; veths only
# between namespaces this script makes, private bpffs mounts under /run/kpr-demo.
NPCFG1=examples/demo-tc-nodeport.yaml
NPCFG2=examples/demo-tc-nodeport-node2.yaml
NPLOG1=/run/kpr-demo/np1-agent.log
NPLOG2=/run/kpr-demo/np2-agent.log
NP=kprnp$$                                   # namespace prefix, unique per run
npagent1=""
npagent2=""

np_cleanup() {
  for a in "$npagent1" "$npagent2"; do
    [ -n "$a" ] && { kill -TERM "$a" 2>/dev/null; wait "$a" 2>/dev/null || true; }
  done
  for c in "$NPCFG1:/run/kpr-demo/np1-bpffs" "$NPCFG2:/run/kpr-demo/np2-bpffs"; do
    if mountpoint -q "${c#*:}"; then $KPR cleanup --config "${c%%:*}" >/dev/null 2>&1 || true; fi
  done
  for n in cl p1 p2 n1 n2 rt; do
    if ip netns list | grep -qw "$NP-$n"; then
      for pid in $(ip netns pids "$NP-$n" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
      ip netns del "$NP-$n" 2>/dev/null || true
    fi
  done
  for m in /run/kpr-demo/np1-bpffs /run/kpr-demo/np2-bpffs; do
    mountpoint -q "$m" && umount "$m"
    rmdir "$m" 2>/dev/null || true
  done
}
eval "$(declare -f cleanup_demo | sed '1s/^cleanup_demo/np_prev_cleanup_demo/')"
cleanup_demo() { np_prev_cleanup_demo; np_cleanup; }

# The pods' web server: answers with its name and the client address it sees.
NPSERVER='import http.server, sys
name = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {name}, you are {self.client_address[0]}\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()'

for n in cl rt n1 n2 p1 p2; do ip netns add "$NP-$n"; ip -n "$NP-$n" link set lo up; done
for n in rt n1 n2; do ip netns exec "$NP-$n" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0; done
# client -- router
ip -n "$NP-rt" link add cl0 type veth peer name eth0 netns "$NP-cl"
ip -n "$NP-rt" addr add 10.100.0.1/24 dev cl0; ip -n "$NP-rt" link set cl0 up
ip -n "$NP-cl" addr add 10.100.0.2/24 dev eth0; ip -n "$NP-cl" link set eth0 up
ip -n "$NP-cl" route add default via 10.100.0.1
# router -- nodes; each node holds one pod behind a veth
for i in 1 2; do
  ip -n "$NP-rt" link add "n$i" type veth peer name eth0 netns "$NP-n$i"
  ip -n "$NP-rt" addr add "10.0.$i.1/24" dev "n$i"; ip -n "$NP-rt" link set "n$i" up
  ip -n "$NP-n$i" addr add "10.0.$i.10/24" dev eth0; ip -n "$NP-n$i" link set eth0 up
  ip -n "$NP-n$i" route add default via "10.0.$i.1"
  ip -n "$NP-rt" route add "10.244.$i.0/24" via "10.0.$i.10"
  ip -n "$NP-n$i" link add "lxcp$i" type veth peer name eth0 netns "$NP-p$i"
  ip -n "$NP-n$i" addr add 169.254.1.1/32 dev "lxcp$i"; ip -n "$NP-n$i" link set "lxcp$i" up
  ip -n "$NP-n$i" route add "10.244.$i.11/32" dev "lxcp$i"
  ip -n "$NP-p$i" addr add "10.244.$i.11/32" dev eth0; ip -n "$NP-p$i" link set eth0 up
  ip -n "$NP-p$i" route add 169.254.1.1 dev eth0 scope link
  ip -n "$NP-p$i" route add default via 169.254.1.1 dev eth0
  (ip netns exec "$NP-p$i" python3 -c "$NPSERVER" "p$i" >/dev/null 2>&1 &)
done
# the LoadBalancer IPs are node1's to serve (what BGP or ARP announcement would arrange)
ip -n "$NP-rt" route add 203.0.113.96/28 via 10.0.1.10
for i in 1 2; do mkdir -p "/run/kpr-demo/np$i-bpffs"; mount -t bpf bpf "/run/kpr-demo/np$i-bpffs"; done

$KPR check-config --config $NPCFG1
ip netns exec "$NP-n1" $KPR run --config $NPCFG1 2>"$NPLOG1" &
npagent1=$!
ip netns exec "$NP-n2" $KPR run --config $NPCFG2 2>"$NPLOG2" &
npagent2=$!
for c in "$NPCFG1:$npagent1:$NPLOG1" "$NPCFG2:$npagent2:$NPLOG2"; do
  cfg=${c%%:*}; rest=${c#*:}; pid=${rest%%:*}; logf=${rest#*:}
  for _ in $(seq 1 150); do
    if $KPR status --config "$cfg" --json 2>/dev/null | grep -q '"ready": true'; then break; fi
    kill -0 "$pid" 2>/dev/null || { echo "the tc_nodeport agent ($cfg) exited; its log:"; cat "$logf"; exit 1; }
    sleep 0.1
  done
done

npcurl() { ip netns exec "$NP-cl" curl -s --max-time 3 "$@" || echo "(no answer)"; }
echo
echo "== tc_nodeport: client 10.100.0.2 -> node1 (agents in $NP-n1 and $NP-n2, programs on their eth0)"
printf 'NodePort 10.0.1.10:30180 (web-local, pod p1 on node1):        '; npcurl http://10.0.1.10:30180/
printf 'LoadBalancer 203.0.113.100 (web-remote, p2 on node2, SNAT):   '; npcurl http://203.0.113.100/
printf 'LoadBalancer 203.0.113.101 (web-dsr, p2 on node2, DSR):       '; npcurl http://203.0.113.101/
printf 'healthCheckNodePort 32180 on node1 (has a local endpoint):    '; npcurl -w ' HTTP %{http_code}\n' http://10.0.1.10:32180/
printf 'healthCheckNodePort 32180 on node2 (has none):                '; npcurl -w ' HTTP %{http_code}\n' http://10.0.2.10:32180/
echo
echo "== kpr status (node1's tc_nodeport agent)"
$KPR status --config $NPCFG1 2>/dev/null | sed -n '/^plugin tc_nodeport/,$p' || true
echo
echo "(tc_nodeport agent logs: $NPLOG1 $NPLOG2)"
