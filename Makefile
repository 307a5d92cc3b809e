# Every target installs what it needs: missing Debian packages, then .venv with lamina.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Block tools and peers (qemu-img, qemu-nbd, nbdinfo, nbdcopy, fio), layer tools
# (mkfs.erofs, fuse3), anchors for the benchmarks (borg, casync, nbdkit, nbd-server), what
# the demo image is built from (the VM, its bootloader, busybox, the ISO seed tools), and
# the single-node Ceph cluster whose RADOS Gateway the object-store tests use (no ceph-mgr:
# the gateway runs without one).
DEBS := qemu-utils libnbd-bin nbdkit nbd-server fio erofs-utils fuse3 \
        borgbackup casync squashfs-tools e2fsprogs xorriso busybox-static \
        qemu-system-x86 extlinux syslinux-common dosfstools mtools cpio util-linux \
        kmod zstd curl ca-certificates postgresql chromium \
        ceph-mon ceph-osd radosgw ceph-common

.PHONY: install deps demo test bench lint clean

deps:
	@tools/ensure-debs $(DEBS)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: deps $(STAMP)

demo: install
	$(BIN)/lamina demo

test: install
	$(BIN)/pytest

bench: install
	@set -e; for b in $(filter-out bench/common.py,$(wildcard bench/*.py)); do \
		echo "== $$b"; $(BIN)/python $$b; done

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
