cmd_/work/main/guest-driver/snd-xen-vsnd.o := ld -m elf_x86_64 -z noexecstack --no-warn-rwx-segments   -r -o /work/main/guest-driver/snd-xen-vsnd.o @/work/main/guest-driver/snd-xen-vsnd.mod 
