#!/usr/bin/env bash
# SSH to 127.0.0.1 for `ray up cluster_configs/local.yaml` tests: installs openssh-server and
# rsync (apt, as root), creates user kiln-rayup, and runs sshd on loopback only with key auth.
#   loopback_sshd.sh start DIR   -> DIR/id_ed25519 (the key), DIR/sshd.pid, DIR/port
#     Port 22 when it is free on 127.0.0.1 (cluster YAMLs have no SSH port; Ray always dials
#     22), else a free port, which then needs auth.ssh_proxy_command to reach it.
#   loopback_sshd.sh stop DIR    -> stops that sshd
set -euo pipefail
action=$1; dir=$2
user=kiln-rayup
if [ "$action" = stop ]; then
  [ -f "$dir/sshd.pid" ] && kill "$(cat "$dir/sshd.pid")" 2>/dev/null || true
  exit 0
fi
if ! { [ -x /usr/sbin/sshd ] && command -v rsync >/dev/null; }; then
  apt-get install -y --no-install-recommends openssh-server rsync >/dev/null 2>&1 ||
    { apt-get update >/dev/null && apt-get install -y --no-install-recommends openssh-server rsync >/dev/null; }
fi
id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
# No password at all, but not "locked" ("!"): sshd without PAM refuses locked accounts.
usermod -p '*' "$user"
mkdir -p "$dir"
ssh-keygen -q -t ed25519 -N '' -f "$dir/id_ed25519" <<<y >/dev/null
ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key" <<<y >/dev/null
home=$(getent passwd "$user" | cut -d: -f6)
install -d -m 700 -o "$user" "$home/.ssh"
install -m 600 -o "$user" "$dir/id_ed25519.pub" "$home/.ssh/authorized_keys"
port=$(python3 - <<'PY'
import socket
for port in (22, 0):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    print(s.getsockname()[1])
    break
PY
)
mkdir -p /run/sshd
/usr/sbin/sshd -f /dev/null -h "$dir/host_key" -p "$port" -o ListenAddress=127.0.0.1 \
  -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no -o PubkeyAuthentication=yes \
  -o PermitRootLogin=no -o "AllowUsers=$user" -o "PidFile=$dir/sshd.pid" -o UsePAM=no
echo "$port" > "$dir/port"
echo "$user"
