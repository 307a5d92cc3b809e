"""Network boot (PXE, iPXE): what a machine without a disk needs to boot from lamina.

partitions.py  a disk's partitions from its MBR or GPT
ext4.py        files read out of an ext2/3/4 file system, without mounting it
bootfiles.py   an image version's kernel, initrd and arguments, kept per version
ipxe.py        the iPXE scripts and the kernel command line of a network boot
dnsmasq.py     a proxy-DHCP configuration for dnsmasq (legacy PXE and UEFI to iPXE)
cpio.py        the cpio "newc" writer initramfs archives are packed with
tlsfiles.py    a machine's short-lived TLS credential as an initrd of its own
"""
