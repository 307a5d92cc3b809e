"""The guest side: what runs inside a lamina machine, and how images get it.

The guest kit (``lamina guest install ROOT``, and every ``lamina image build``) puts into
a root file system:

- lamina's agent under ``/opt/lamina`` (its own Python packages, run by the guest's
  Python), started by ``lamina-agent.service`` with the manager's URL and the machine's
  token from the seed;
- an initramfs-tools hook that reads the seed disk (label ``cidata``) and writes the
  hostname, machine-id and SSH host keys into the root before ``switch_root``, so PID 1,
  journald and sshd start with the database's identity on every boot;
- a PAM session hook: at login the agent composes the user's layers into the running
  system (``lamina.guest.session``), at logout it saves the writable layer;
- what a stock Debian root lacks to boot well from lamina: a generated locale for
  cloud-init's locale step, ``FSTYPE`` for fsck in the initramfs, a persistent journal,
  the seed device readable by root only.

Modules: ``paths`` (where things live in the guest), ``kit`` (installing the kit into a
root), ``pyenv`` (the agent's Python packages for the guest's Python), ``session`` (the
agent's system mode), ``debian`` and ``disk`` (``lamina image build``).
"""
