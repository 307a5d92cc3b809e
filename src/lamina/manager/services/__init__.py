"""Service functions: keyword-only, one transaction's worth of work each; SQL lives here.
Each admin operation is one function holding all its rules, called by every front end
(through ``lamina.manager.admin``).

images.py           images and their versions
machines.py         machines: add, show, change (identity, mode, re-pin), reset, remove
commit.py           a machine's delta committed as a new image version
layers.py           layers, their versions and bases, mounted roots; removing them
layer_images.py     layer versions' EROFS images, built once and recorded; read-ahead profiles
versions.py         numbering NAME@1, NAME@2, ... (images and layers alike)
access.py           users, groups, memberships, entitlements
changes.py          telling agents their desired state changed (the changes table)
agents.py           what agents ask for: boot, login, logout, desired state
readable.py         which chunks a machine may read (asked afresh at every request)
staged.py           chunks a machine uploaded and has not saved yet: its upload quota
rebase.py           rebase plans and records, the rule table
profiles.py         boot profiles, one per image version
fleet.py            paged, filtered views of the fleet (admin API and console)
console.py          what the console shows beyond the other services
console_access.py   the console's views of layers, users and groups
store.py            what the chunk store must keep (the roots), for gc and verify
netboot.py          network boot: machines by MAC, devices that are no machine, auto-add
recovery.py         roots in the store the database does not know: kept by gc, listed
                    by reindex (what the packs can tell)
settings.py         installation settings kept in the database
credentials.py      TLS client credentials: issue, rotate, whom a certificate stands for
hypervisor.py       a machine as a libvirt domain or a qemu command line (NBD disk, seed, MAC)
servers.py          block servers and their heartbeats; which one serves each machine
cluster_ca.py       the one certificate authority of a home's folders (a cluster's servers)
accounts.py         named admin accounts: roles (admin, helpdesk) and tokens
audit.py            the audit log: who changed what, when, from where (each service records)
"""
