/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * snd-xen-vsnd: a Xen PV sound (vsnd) frontend that reports the backend's
 * delay to ALSA, raises period interrupts as soon as a whole period has
 * passed, and lets applications mmap the buffer shared with the backend.
 */
#ifndef VSND_H
#define VSND_H

#include <linux/completion.h>
#include <linux/mutex.h>
#include <linux/spinlock.h>
#include <linux/types.h>
#include <sound/control.h>
#include <sound/core.h>
#include <sound/pcm.h>
#include <xen/grant_table.h>
#include <xen/interface/io/ring.h>
#include <xen/interface/io/sndif.h>
#include <xen/xenbus.h>

/* How long a request waits for the backend's response. */
#define VSND_REQ_TIMEOUT_MS	3000
/* The delay extension: a key in both device directories, and where the
 * backend puts the delay (frames, little endian) in a CUR_POS event.
 */
#define VSND_FEATURE_DELAY	"feature-delay-report"
#define VSND_EVT_DELAY_OFFSET	16
#define VSND_MAX_RATES		32
#define VSND_NAME_LEN		80

/* What a stream may be opened with: the card's configuration, narrowed by
 * the pcm's and the stream's own entries.
 */
struct vsnd_hw {
	u64 formats;			/* SNDRV_PCM_FMTBIT_* */
	unsigned int rates[VSND_MAX_RATES];
	unsigned int nrates;
	unsigned int channels_min;
	unsigned int channels_max;
	unsigned int buffer_bytes_max;
};

struct vsnd_card;

/* One vsnd stream: its request ring, its event page, and while a substream
 * uses it, the buffer shared with the backend and the DMA position.
 */
struct vsnd_stream {
	struct vsnd_card *card;
	unsigned int pcm_index;
	unsigned int subdevice;		/* its place among the pcm's streams of its direction */
	bool capture;
	char xs_path[VSND_NAME_LEN];
	struct vsnd_hw hw;

	/* Request ring; ring_lock guards it, dead and the announce counters. */
	struct xen_sndif_front_ring ring;
	void *ring_page;
	grant_ref_t ring_gref;
	evtchn_port_t req_port;
	int req_irq;
	spinlock_t ring_lock;		/* the ring, dead, announce counters */
	u16 next_req_id;
	struct mutex sync_lock;		/* one synchronous request at a time */
	struct completion sync_done;
	u16 sync_id;
	bool sync_pending;
	int sync_status;
	struct xensnd_query_hw_param sync_hw;
	bool dead;			/* the backend went away */
	/* The last HW_PARAM_QUERY and its answer (sync_lock): ALSA's refine
	 * loop asks the same question many times.
	 */
	bool query_valid;
	int query_status;
	struct xensnd_query_hw_param query_req;
	struct xensnd_query_hw_param query_resp;

	/* Event page. */
	struct xensnd_event_page *evt_page;
	grant_ref_t evt_gref;
	evtchn_port_t evt_port;
	int evt_irq;
	u32 evt_cons;

	/* The shared buffer and its page directory, from hw_params. */
	void *buf;
	size_t buf_alloc;		/* bytes allocated, whole pages */
	unsigned int buf_npages;
	grant_ref_t *buf_grefs;
	void **dir_pages;
	grant_ref_t *dir_grefs;
	unsigned int dir_npages;
	bool be_open;

	/* Runtime state; lock guards it against the event interrupt, and
	 * nothing else reads it.
	 */
	spinlock_t lock;
	struct snd_pcm_substream *substream;
	unsigned int frame_bytes;
	snd_pcm_uframes_t buffer_frames;
	snd_pcm_uframes_t period_frames;
	u64 be_frames;			/* position of the last CUR_POS */
	snd_pcm_uframes_t hw_ptr;
	snd_pcm_uframes_t since_period;
	snd_pcm_uframes_t cycle;	/* frames the last moving event moved */
	snd_pcm_sframes_t delay;	/* as of the event: vsnd_delay_at_event() */
	snd_pcm_sframes_t delay_told;	/* the delay control's last notice */
	unsigned int rate;
	struct snd_kcontrol *delay_ctl;	/* "Playback/Capture Host Delay" */
	u64 total_frames;		/* frames the backend moved since OPEN */
	u64 periods;			/* period interrupts raised */
	u64 early_periods;		/* ... before a whole period had passed */
	unsigned long pointer_jiffies;	/* when ALSA last read the pointer */
	unsigned int rate_list[VSND_MAX_RATES];
	struct snd_pcm_hw_constraint_list rate_constraint;

	/* What the application gave (playback) or took (capture), and how
	 * much of it the backend has been told with WRITE/READ, in bytes since
	 * prepare, in a buffer of ring_bytes; ring_lock.
	 */
	snd_pcm_uframes_t last_appl;
	u64 appl_bytes;
	u64 told_bytes;
	u32 ring_bytes;
};

struct vsnd_pcm_cfg {
	char name[VSND_NAME_LEN];
	unsigned int nplayback;
	unsigned int ncapture;
};

struct vsnd_card {
	struct xenbus_device *xb;
	unsigned int devid;		/* vsnd/<devid>: picks index= and id= */
	char short_name[32];
	char long_name[VSND_NAME_LEN];
	struct vsnd_pcm_cfg *pcms;
	unsigned int npcms;
	struct vsnd_stream *streams;
	unsigned int nstreams;
	bool backend_reports_delay;
	bool channels_ready;
	struct snd_card *card;
};

/* vsnd_cfg.c */
int vsnd_read_config(struct vsnd_card *vc);
void vsnd_free_config(struct vsnd_card *vc);
int vsnd_format_to_xen(snd_pcm_format_t fmt);
u64 vsnd_xen_formats_to_alsa(u64 xen_mask);
u64 vsnd_alsa_formats_to_xen(u64 alsa_mask);

/* vsnd_chan.c */
int vsnd_channels_create(struct vsnd_card *vc);
int vsnd_channels_publish(struct vsnd_card *vc);
void vsnd_channels_free(struct vsnd_card *vc);
void vsnd_stream_kill(struct vsnd_stream *s, int status);
bool vsnd_stream_dead(struct vsnd_stream *s);
int vsnd_request(struct vsnd_stream *s, struct xensnd_req *req);
int vsnd_query(struct vsnd_stream *s, const struct xensnd_query_hw_param *ask,
	       struct xensnd_query_hw_param *got);
void vsnd_announce(struct vsnd_stream *s);
bool vsnd_request_async(struct vsnd_stream *s, const struct xensnd_req *req);
int vsnd_buffer_alloc(struct vsnd_stream *s, size_t bytes);
void vsnd_buffer_free(struct vsnd_stream *s);

/* vsnd_pcm.c */
int vsnd_card_create(struct vsnd_card *vc);
void vsnd_card_remove(struct vsnd_card *vc);
void vsnd_handle_cur_pos(struct vsnd_stream *s, u64 pos_bytes, u32 delay, bool *stamp,
			 bool *elapsed, bool *delay_changed);

#endif /* VSND_H */
