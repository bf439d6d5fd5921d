/work/main/guest-driver/vsnd_front.o
/work/main/guest-driver/vsnd_cfg.o
/work/main/guest-driver/vsnd_chan.o
/work/main/guest-driver/vsnd_pcm.o
