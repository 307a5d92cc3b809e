# Every target installs what it needs: missing Debian packages, then .venv with lamina.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Each target installs the Debian packages it needs, and no more.
# lamina itself: qemu-img (image import/export), mkfs.erofs and FUSE (layers), mkfs.ext4.
DEBS_BASE := qemu-utils erofs-utils fuse3 e2fsprogs util-linux mount
# The demo VM: its kernel and busybox come from apt (ca-certificates for the mirror), it
# is laid out in ext4 with extlinux's boot code and booted by qemu.
DEBS_DEMO := qemu-utils qemu-system-x86 extlinux syslinux-common e2fsprogs mount \
        util-linux ca-certificates
# The tests: real NBD clients and peers (nbdinfo, nbdcopy, nbdkit, nbd-server, fio),
# layer and image tools, PostgreSQL, Chromium for the console's browser tests, the
# single-node Ceph cluster whose RADOS Gateway the object-store tests use (no ceph-mgr:
# the gateway runs without one), systemd-analyze for the service units, libvirt's client
# with its test driver and schemas (checked with xmllint) for the domain XML, and network
# boot: qemu's iPXE ROMs, iPXE's binaries for chainloading, UEFI firmware, dnsmasq (its
# --test checks the proxy-DHCP configuration), sfdisk (partition tables).
DEBS_TEST := $(DEBS_BASE) $(DEBS_DEMO) libnbd-bin nbdkit nbd-server fio squashfs-tools \
        xorriso busybox-static dosfstools mtools cpio kmod zstd curl postgresql chromium \
        ceph-mon ceph-osd radosgw ceph-common systemd libvirt-clients libxml2-utils \
        mmdebstrap openssh-client ipxe ipxe-qemu ovmf dnsmasq-base fdisk iproute2
# The VM end-to-end runs: the tests' packages (the demo VM runs share their fixtures:
# PostgreSQL, the NBD clients, iPXE, UEFI firmware, dnsmasq for proxy DHCP), what `lamina
# image build` makes the Debian machines with (mmdebstrap) and reaches them by (ssh), and
# nbd-client for the netroot checks.
DEBS_E2E := $(DEBS_TEST) nbd-client
# The benchmarks: their anchors (qemu-nbd, borg, casync, nbdkit, nbd-server) and fio.
DEBS_BENCH := $(DEBS_BASE) $(DEBS_DEMO) libnbd-bin nbdkit nbd-server fio borgbackup casync \
        ceph-mon ceph-osd radosgw ceph-common

.PHONY: install deps demo test e2e bench lint clean

deps:
	@tools/ensure-debs $(DEBS_BASE)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: deps $(STAMP)

demo: $(STAMP)
	@tools/ensure-debs $(DEBS_DEMO)
	$(BIN)/lamina demo

# Two pytest workers: a test spends most of its time waiting on the processes it starts
# (the CLI, servers, NBD clients), so one worker kept a 2-core host about half busy (833
# tests: 19.9 min alone, 10.4 min in two). The tests on the one Ceph cluster share a
# worker (``xdist_group``), so it starts once.
TEST_WORKERS ?= 2
test: $(STAMP)
	@tools/ensure-debs $(sort $(DEBS_TEST))
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup

# The heavy end-to-end runs, left out of `make test`: real Debian machines under qemu
# (TCG) from an image `lamina image build` makes and caches in $$LAMINA_TEST_CACHE
# (default /var/tmp/lamina-test-cache), and the demo VMs: booted from lamina, over TLS,
# over the network, riding out server kills, restored from a backup. Most of the time is
# the machines' boots under TCG.
e2e: $(STAMP)
	@tools/ensure-debs $(sort $(DEBS_E2E))
	$(BIN)/pytest -m e2e

bench: $(STAMP)
	@tools/ensure-debs $(sort $(DEBS_BENCH))
	@set -e; for b in $(filter-out bench/common.py,$(wildcard bench/*.py)); do \
		echo "== $$b"; $(BIN)/python $$b; done

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
