"""The guest side: what runs inside a lamina machine, and how images get it.

The guest kit (``lamina guest install ROOT``, and every ``lamina image build``) puts into
a root file system:

- lamina's agent under ``/opt/lamina`` (its own Python packages, run by the guest's
  Python), started by ``lamina-agent.service`` with the manager's URL and the machine's
  token from the seed;
- an initramfs-tools hook that reads the seed disk (label ``cidata``) and writes the
  hostname, machine-id and SSH host keys into the root before ``switch_root``, so PID 1,
  journald and sshd start with the database's identity on every boot;
- for a machine booted from the network: the nbd-client the initramfs runs (the root of
  ``nbdroot=`` and the seed of ``lamina.seed=``, TLS with ``lamina.tls=1``), and
  ``lamina-netroot.service``, which gives the root a new connection when its own is lost;
- a PAM session hook: at login the agent composes the user's layers into the running
  system (``lamina.guest.session``), at logout it saves the writable layer;
- what a stock Debian root lacks to boot well from lamina: a generated locale for
  cloud-init's locale step, ``FSTYPE`` for fsck in the initramfs, a persistent journal,
  the seed device readable by root only.

paths.py     where the kit puts things in a machine; the manager's URL for seeds
kit.py       the kit into a root (``lamina guest install ROOT``)
pyenv.py     lamina and its dependencies for the guest's Python, cached
chroot.py    running a root's own tools (update-initramfs, locale-gen) in it
session.py   the agent's system mode: a user's layers in the running system
debian.py    a Debian root with mmdebstrap, from this host's apt sources
disk.py      the bootable disk of a root (MBR, ext4, extlinux)
build.py     ``lamina image build``: bootstrap, kit, disk, imports, caches
netroot.py   a network root's lost connection made again (``lamina-netroot.service``)
genl.py      generic netlink messages for the kernel's nbd family
files/       what the kit installs as it is (units, PAM hook, initramfs scripts, udev rule)
"""
