#!/usr/bin/env bash
# Start every service the tests need if it is down; install etcd when missing.
# Never restarts or reconfigures a service that is already running.
set -uo pipefail

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local name=$1 port=$2 i
  for i in $(seq 1 120); do
    listening "$port" && { echo "ci: $name answers on $port"; return 0; }
    sleep 1
  done
  echo "ci: $name did not come up on port $port" >&2
  return 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

listening 5432 || as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
listening 6379 || as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
  --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
listening 5672 || as_root rabbitmq-server -detached
listening 1883 || as_root mosquitto -d -c /etc/mosquitto/mosquitto.conf
listening 4222 || as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server \
  -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log

need_pkgs=()
command -v etcd >/dev/null || need_pkgs+=(etcd-server etcd-client)
command -v rsyslogd >/dev/null || need_pkgs+=(rsyslog)
command -v wrk >/dev/null || need_pkgs+=(wrk)
command -v chromium >/dev/null || need_pkgs+=(chromium)  # the dashboard's browser test
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "ci: installing ${need_pkgs[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
if ! listening 2379; then
  mkdir -p /tmp/stanchion-ci-etcd
  setsid nohup etcd --name ci --data-dir /tmp/stanchion-ci-etcd/data \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster ci=http://127.0.0.1:2380 --log-level warn \
    >/tmp/stanchion-ci-etcd/etcd.log 2>&1 < /dev/null &
fi

ok=0
wait_port postgresql 5432 || ok=1
wait_port redis 6379 || ok=1
wait_port rabbitmq 5672 || ok=1
wait_port mosquitto 1883 || ok=1
wait_port nats 4222 || ok=1
wait_port etcd 2379 || ok=1
# RabbitMQ opens its port before it accepts AMQP sessions; wait until it does.
for i in $(seq 1 60); do
  rabbitmqctl -q await_startup >/dev/null 2>&1 && break
  sleep 2
done
exit $ok
