cmd_/work/main/guest-driver/modules.order := {   echo /work/main/guest-driver/snd-xen-vsnd.ko; :; } > /work/main/guest-driver/modules.order
