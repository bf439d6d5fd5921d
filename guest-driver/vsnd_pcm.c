// SPDX-License-Identifier: GPL-2.0-only
/*
 * snd-xen-vsnd: the ALSA card. The buffer shared with the backend is the
 * PCM's DMA area, so read/write and mmap both work on it directly; the
 * application pointer reaches the backend through .ack (WRITE/READ). The
 * backend's CUR_POS events move the hardware pointer, raise a period
 * interrupt once a whole period has passed, and (when both ends speak the
 * delay extension) carry the delay behind the pointer into runtime->delay.
 */
#include <linux/interrupt.h>
#include <linux/math64.h>
#include <sound/initval.h>
#include <sound/pcm_params.h>
#include "vsnd.h"

static const struct snd_pcm_hardware vsnd_hw_base = {
	.info = SNDRV_PCM_INFO_MMAP | SNDRV_PCM_INFO_MMAP_VALID |
		SNDRV_PCM_INFO_INTERLEAVED | SNDRV_PCM_INFO_PAUSE |
		/* alsa-lib then reports every appl_ptr move, even in mmap mode */
		SNDRV_PCM_INFO_SYNC_APPLPTR,
	.rates = SNDRV_PCM_RATE_KNOT,
	.period_bytes_min = 64,
	.periods_min = 2,
	.periods_max = 1024,
};

static struct vsnd_stream *vsnd_find_stream(struct snd_pcm_substream *ss)
{
	struct vsnd_card *vc = snd_pcm_substream_chip(ss);
	bool capture = ss->stream == SNDRV_PCM_STREAM_CAPTURE;
	unsigned int i;

	for (i = 0; i < vc->nstreams; i++) {
		struct vsnd_stream *s = &vc->streams[i];

		if (s->pcm_index == ss->pcm->device && s->capture == capture &&
		    s->subdevice == ss->number)
			return s;
	}
	return NULL;
}

/*
 * Whether the delay moved far enough from what the delay control last
 * announced to announce it again: a millisecond, or to or from 0. Keeps
 * the control's readers (a guest sound server setting its latency) from
 * waking on every cycle's jitter. s->lock held.
 */
static bool vsnd_delay_moved(struct vsnd_stream *s)
{
	snd_pcm_sframes_t step = max(s->rate / 1000, 1U);
	snd_pcm_sframes_t d = s->delay, told = s->delay_told;
	bool both_zero_or_not = !d == !told;

	if (both_zero_or_not && abs(d - told) < step)
		return false;
	s->delay_told = d;
	return true;
}

/*
 * Whether a move of the pointer that completes no period may still be
 * announced to ALSA from the event interrupt (vsnd_evt_irq). ALSA takes an
 * interrupt-time update that has not reached the next period boundary,
 * coming more than half a buffer after the pointer was last updated (by
 * its own measure of a buffer in jiffies), for a lost wrap-around and
 * moves the pointer a whole buffer on. Every pointer read updates it, so a
 * move is safe to announce within half a buffer of the last read; after a
 * longer silence (the backend paused, nobody reading) the move waits for
 * the next read. s->lock held.
 */
static bool vsnd_stamp_is_safe(struct vsnd_stream *s)
{
	unsigned long half_buffer = (unsigned long)s->buffer_frames * HZ / s->rate / 2;

	return time_before_eq(jiffies, s->pointer_jiffies + half_buffer);
}

/*
 * The backend's delay, as of the event that brought it. The backend's
 * figure refers to the end of its cycle: it takes (or gives) a cycle's
 * frames at the cycle's start, its position is past them, and its delay is
 * its host's figure for the first of them, so the pointer then stays put
 * while the host plays (or captures) that cycle. ALSA keeps time by the
 * event (the status stamp, and runtime->delay read at any time), and as of
 * the event a playback frame at the pointer is heard a cycle later than
 * the figure says, a captured one was taken a cycle sooner: below zero for
 * a capture fed in the same host cycle (a straight link from a player).
 * docs/protocol.md has the definition. s->lock held.
 */
static snd_pcm_sframes_t vsnd_delay_at_event(struct vsnd_stream *s, u32 delay)
{
	snd_pcm_sframes_t cycle = s->cycle;

	return s->capture ? (snd_pcm_sframes_t)delay - cycle : (snd_pcm_sframes_t)delay + cycle;
}

/*
 * Called with s->lock held, from the event interrupt. Sets *stamp when the
 * pointer moved and ALSA may be told of it now (vsnd_stamp_is_safe),
 * *elapsed when a whole period has passed.
 */
void vsnd_handle_cur_pos(struct vsnd_stream *s, u64 pos_bytes, u32 delay, bool *stamp,
			 bool *elapsed, bool *delay_changed)
{
	u64 frames, delta;
	u32 rem;

	if (!s->substream || !s->frame_bytes || !s->buffer_frames || !s->period_frames)
		return;
	frames = div_u64(pos_bytes, s->frame_bytes);
	if (frames < s->be_frames) {
		/* Only a new OPEN starts the position again. */
		s->be_frames = frames;
		return;
	}
	delta = frames - s->be_frames;
	s->be_frames = frames;
	if (delta)
		s->cycle = delta;
	if (s->card->backend_reports_delay) {
		s->delay = vsnd_delay_at_event(s, delay);
		if (vsnd_delay_moved(s))
			*delay_changed = true;
	}
	if (!delta)
		return;
	if (vsnd_stamp_is_safe(s))
		*stamp = true;
	div_u64_rem(s->hw_ptr + delta, s->buffer_frames, &rem);
	s->hw_ptr = rem;
	s->total_frames += delta;
	s->since_period += delta;
	/* A period interrupt promises a whole period is done: never sooner. */
	if (s->since_period >= s->period_frames) {
		s->since_period %= s->period_frames;
		s->periods++;
		if (s->periods * s->period_frames > s->total_frames)
			s->early_periods++;
		*elapsed = true;
	}
}

#define VSND_FMT	SNDRV_PCM_HW_PARAM_FORMAT
#define VSND_RATE	SNDRV_PCM_HW_PARAM_RATE
#define VSND_CH		SNDRV_PCM_HW_PARAM_CHANNELS
#define VSND_PERIOD	SNDRV_PCM_HW_PARAM_PERIOD_SIZE
#define VSND_BUFFER	SNDRV_PCM_HW_PARAM_BUFFER_SIZE

/* The parameters a rule asks the backend about: each rule narrows the
 * first and depends on the other four (a rule has room for four).
 */
static const int vsnd_rules[][5] = {
	{ VSND_FMT, VSND_RATE, VSND_CH, VSND_PERIOD, VSND_BUFFER },
	{ VSND_RATE, VSND_FMT, VSND_CH, VSND_PERIOD, VSND_BUFFER },
	{ VSND_CH, VSND_FMT, VSND_RATE, VSND_PERIOD, VSND_BUFFER },
	{ VSND_PERIOD, VSND_FMT, VSND_RATE, VSND_CH, VSND_BUFFER },
	{ VSND_BUFFER, VSND_FMT, VSND_RATE, VSND_CH, VSND_PERIOD },
};

static int vsnd_refine_interval(struct snd_pcm_hw_params *params, int var, u32 min, u32 max)
{
	struct snd_interval got = { .min = min, .max = max, .integer = 1 };

	/* A range the backend left open (0) narrows nothing. */
	if (!max || min > max)
		return 0;
	return snd_interval_refine(hw_param_interval(params, var), &got);
}

/*
 * A hardware rule: asks the backend what it can do within the ranges ALSA
 * has refined so far (every parameter's), and narrows the one this rule is
 * for to the answer. So what the backend can do for the other parameters
 * chosen (a rate only at some formats, a buffer limit in bytes) reaches
 * the application while it negotiates, not as a failed prepare.
 */
static int vsnd_hw_rule(struct snd_pcm_hw_params *params, struct snd_pcm_hw_rule *rule)
{
	struct vsnd_stream *s = rule->private;
	struct snd_mask *fmask = hw_param_mask(params, VSND_FMT);
	struct snd_interval *rate = hw_param_interval(params, VSND_RATE);
	struct snd_interval *ch = hw_param_interval(params, VSND_CH);
	struct snd_interval *period = hw_param_interval(params, VSND_PERIOD);
	struct snd_interval *buffer = hw_param_interval(params, VSND_BUFFER);
	struct xensnd_query_hw_param ask = {}, got;
	struct snd_mask formats;
	int ret;

	ask.formats = vsnd_alsa_formats_to_xen((u64)fmask->bits[0] | (u64)fmask->bits[1] << 32);
	ask.rates.min = rate->min;
	ask.rates.max = rate->max;
	ask.channels.min = ch->min;
	ask.channels.max = ch->max;
	ask.period.min = period->min;
	ask.period.max = period->max;
	ask.buffer.min = buffer->min;
	ask.buffer.max = buffer->max;
	ret = vsnd_query(s, &ask, &got);
	/* -EINVAL: nothing in these ranges. A backend that cannot answer
	 * (no such request, no answer in time) narrows nothing: the card's
	 * configuration stands, and OPEN has the last word.
	 */
	if (ret == -EINVAL || ret == -ENODEV)
		return ret;
	if (ret)
		return 0;

	switch (rule->var) {
	case VSND_FMT: {
		u64 bits = vsnd_xen_formats_to_alsa(got.formats);

		if (!bits)
			return 0;
		snd_mask_none(&formats);
		formats.bits[0] = lower_32_bits(bits);
		formats.bits[1] = upper_32_bits(bits);
		return snd_mask_refine(fmask, &formats);
	}
	case VSND_RATE:
		return vsnd_refine_interval(params, rule->var, got.rates.min, got.rates.max);
	case VSND_CH:
		return vsnd_refine_interval(params, rule->var, got.channels.min, got.channels.max);
	case VSND_PERIOD:
		return vsnd_refine_interval(params, rule->var, got.period.min, got.period.max);
	case VSND_BUFFER:
		return vsnd_refine_interval(params, rule->var, got.buffer.min, got.buffer.max);
	}
	return 0;
}

static int vsnd_pcm_open(struct snd_pcm_substream *ss)
{
	struct snd_pcm_runtime *rt = ss->runtime;
	struct vsnd_stream *s = vsnd_find_stream(ss);
	unsigned int i, n = 0;
	int ret;

	if (!s || vsnd_stream_dead(s))
		return -ENODEV;
	ss->private_data = s;
	/* What the backend can do may have changed since the last open (a
	 * host back at another rate): ask afresh.
	 */
	mutex_lock(&s->sync_lock);
	s->query_valid = false;
	mutex_unlock(&s->sync_lock);

	/* What the card's configuration allows; the rules narrow it to what
	 * the backend can do.
	 */
	rt->hw = vsnd_hw_base;
	rt->hw.formats = s->hw.formats;
	rt->hw.rate_min = UINT_MAX;
	rt->hw.rate_max = 0;
	for (i = 0; i < s->hw.nrates; i++) {
		rt->hw.rate_min = min(rt->hw.rate_min, s->hw.rates[i]);
		rt->hw.rate_max = max(rt->hw.rate_max, s->hw.rates[i]);
		s->rate_list[n++] = s->hw.rates[i];
	}
	rt->hw.channels_min = s->hw.channels_min;
	rt->hw.channels_max = s->hw.channels_max;
	rt->hw.buffer_bytes_max = s->hw.buffer_bytes_max;
	rt->hw.period_bytes_max = s->hw.buffer_bytes_max / 2;
	s->rate_constraint.count = n;
	s->rate_constraint.list = s->rate_list;
	s->rate_constraint.mask = 0;
	ret = snd_pcm_hw_constraint_list(rt, 0, SNDRV_PCM_HW_PARAM_RATE, &s->rate_constraint);
	if (ret < 0)
		return ret;
	for (i = 0; i < ARRAY_SIZE(vsnd_rules); i++) {
		const int *r = vsnd_rules[i];

		ret = snd_pcm_hw_rule_add(rt, 0, r[0], vsnd_hw_rule, s, r[1], r[2], r[3], r[4], -1);
		if (ret < 0)
			return ret;
	}

	spin_lock_irq(&s->lock);
	s->substream = ss;
	spin_unlock_irq(&s->lock);
	return 0;
}

/* CLOSE on the backend if it has the stream open. */
static void vsnd_backend_close(struct vsnd_stream *s)
{
	struct xensnd_req req = { .operation = XENSND_OP_CLOSE };

	if (!s->be_open)
		return;
	s->be_open = false;
	vsnd_request(s, &req);
}

static int vsnd_pcm_close(struct snd_pcm_substream *ss)
{
	struct vsnd_stream *s = ss->private_data;

	spin_lock_irq(&s->lock);
	s->substream = NULL;
	spin_unlock_irq(&s->lock);
	/* An event handler that still saw the substream is done with it. */
	if (s->evt_irq > 0)
		synchronize_irq(s->evt_irq);
	return 0;
}

static int vsnd_pcm_hw_params(struct snd_pcm_substream *ss, struct snd_pcm_hw_params *params)
{
	struct snd_pcm_runtime *rt = ss->runtime;
	struct vsnd_stream *s = ss->private_data;
	size_t bytes = params_buffer_bytes(params);
	int ret;

	vsnd_backend_close(s);
	vsnd_buffer_free(s);
	ret = vsnd_buffer_alloc(s, bytes);
	if (ret)
		return ret;
	rt->dma_area = s->buf;
	rt->dma_addr = 0;
	rt->dma_bytes = bytes;
	return 0;
}

static int vsnd_pcm_hw_free(struct snd_pcm_substream *ss)
{
	struct snd_pcm_runtime *rt = ss->runtime;
	struct vsnd_stream *s = ss->private_data;
	u64 frames, periods, early;
	snd_pcm_uframes_t period;

	vsnd_backend_close(s);
	spin_lock_irq(&s->lock);
	frames = s->total_frames;
	periods = s->periods;
	early = s->early_periods;
	period = s->period_frames;
	spin_unlock_irq(&s->lock);
	if (frames)
		dev_dbg(&s->card->xb->dev,
			"%s: %llu frames, %llu period interrupts of %lu frames, %llu early\n",
			s->xs_path, frames, periods, period, early);
	vsnd_buffer_free(s);
	rt->dma_area = NULL;
	rt->dma_bytes = 0;
	return 0;
}

/*
 * OPEN on every prepare: the backend's position and its count of what the
 * application gave both start from zero, as ALSA's pointers do now.
 */
static int vsnd_pcm_prepare(struct snd_pcm_substream *ss)
{
	struct snd_pcm_runtime *rt = ss->runtime;
	struct vsnd_stream *s = ss->private_data;
	struct xensnd_req req = { .operation = XENSND_OP_OPEN };
	int fmt = vsnd_format_to_xen(rt->format);
	unsigned long flags;
	int ret;

	if (fmt < 0 || !s->buf)
		return -EINVAL;
	vsnd_backend_close(s);

	spin_lock_irqsave(&s->lock, flags);
	s->frame_bytes = frames_to_bytes(rt, 1);
	s->buffer_frames = rt->buffer_size;
	s->period_frames = rt->period_size;
	s->be_frames = 0;
	s->hw_ptr = 0;
	s->since_period = 0;
	s->cycle = 0;
	s->delay = 0;
	s->rate = rt->rate;
	s->total_frames = 0;
	s->periods = 0;
	s->early_periods = 0;
	s->pointer_jiffies = jiffies;
	spin_unlock_irqrestore(&s->lock, flags);
	spin_lock_irqsave(&s->ring_lock, flags);
	s->last_appl = 0;
	s->appl_bytes = 0;
	s->told_bytes = 0;
	s->ring_bytes = frames_to_bytes(rt, rt->buffer_size);
	spin_unlock_irqrestore(&s->ring_lock, flags);

	req.op.open.pcm_rate = rt->rate;
	req.op.open.pcm_format = fmt;
	req.op.open.pcm_channels = rt->channels;
	req.op.open.buffer_sz = frames_to_bytes(rt, rt->buffer_size);
	req.op.open.gref_directory = s->dir_grefs[0];
	req.op.open.period_sz = frames_to_bytes(rt, rt->period_size);
	ret = vsnd_request(s, &req);
	if (ret)
		return ret;
	s->be_open = true;
	return 0;
}

static int vsnd_pcm_trigger(struct snd_pcm_substream *ss, int cmd)
{
	struct vsnd_stream *s = ss->private_data;
	struct xensnd_req req = { .operation = XENSND_OP_TRIGGER };

	switch (cmd) {
	case SNDRV_PCM_TRIGGER_START:
		req.op.trigger.type = XENSND_OP_TRIGGER_START;
		break;
	case SNDRV_PCM_TRIGGER_STOP:
	case SNDRV_PCM_TRIGGER_SUSPEND:
		req.op.trigger.type = XENSND_OP_TRIGGER_STOP;
		break;
	case SNDRV_PCM_TRIGGER_PAUSE_PUSH:
		req.op.trigger.type = XENSND_OP_TRIGGER_PAUSE;
		break;
	case SNDRV_PCM_TRIGGER_PAUSE_RELEASE:
		req.op.trigger.type = XENSND_OP_TRIGGER_RESUME;
		break;
	default:
		return -EINVAL;
	}
	/* Atomic context: queued behind the WRITEs already on the ring. */
	return vsnd_request_async(s, &req) ? 0 : -EIO;
}

static snd_pcm_uframes_t vsnd_pcm_pointer(struct snd_pcm_substream *ss)
{
	struct vsnd_stream *s = ss->private_data;
	snd_pcm_uframes_t ptr;
	unsigned long flags;

	spin_lock_irqsave(&s->lock, flags);
	ptr = s->hw_ptr;
	ss->runtime->delay = s->delay;
	s->pointer_jiffies = jiffies;
	spin_unlock_irqrestore(&s->lock, flags);
	return ptr;
}

/* After a stop: the period interrupt the event handler may still be
 * raising is over before the stream is set up again or freed.
 */
static int vsnd_pcm_sync_stop(struct snd_pcm_substream *ss)
{
	struct vsnd_stream *s = ss->private_data;

	if (s->evt_irq > 0)
		synchronize_irq(s->evt_irq);
	return 0;
}

/* The application moved its pointer: tell the backend what it gave/took. */
static int vsnd_pcm_ack(struct snd_pcm_substream *ss)
{
	struct snd_pcm_runtime *rt = ss->runtime;
	struct vsnd_stream *s = ss->private_data;
	snd_pcm_uframes_t appl = READ_ONCE(rt->control->appl_ptr);
	snd_pcm_sframes_t moved;
	unsigned long flags;

	spin_lock_irqsave(&s->ring_lock, flags);
	moved = appl - s->last_appl;
	if (moved < 0)
		moved += rt->boundary;
	s->last_appl = appl;
	s->appl_bytes += frames_to_bytes(rt, moved);
	spin_unlock_irqrestore(&s->ring_lock, flags);
	vsnd_announce(s);
	return 0;
}

static const struct snd_pcm_ops vsnd_pcm_ops = {
	.open = vsnd_pcm_open,
	.close = vsnd_pcm_close,
	.hw_params = vsnd_pcm_hw_params,
	.hw_free = vsnd_pcm_hw_free,
	.prepare = vsnd_pcm_prepare,
	.trigger = vsnd_pcm_trigger,
	.sync_stop = vsnd_pcm_sync_stop,
	.pointer = vsnd_pcm_pointer,
	.ack = vsnd_pcm_ack,
};

/*
 * "Playback Host Delay" / "Capture Host Delay" (PCM interface, the stream's
 * device and subdevice): read-only, in microseconds, the part of
 * snd_pcm_delay() beyond the buffer: between the DMA position and the
 * host's converter as of the backend's last event (vsnd_delay_at_event;
 * a capture's can be below zero). 0 without the delay extension or while
 * the stream is not running. A change of a millisecond or more is
 * announced (SNDRV_CTL_EVENT_MASK_VALUE), so a guest sound server can add
 * it to the latency it reports (xen-vsnd-guest does so for PipeWire).
 */
static int vsnd_delay_info(struct snd_kcontrol *kc, struct snd_ctl_elem_info *info)
{
	info->type = SNDRV_CTL_ELEM_TYPE_INTEGER;
	info->count = 1;
	info->value.integer.min = -INT_MAX;
	info->value.integer.max = INT_MAX;
	return 0;
}

static int vsnd_delay_get(struct snd_kcontrol *kc, struct snd_ctl_elem_value *v)
{
	struct vsnd_stream *s = snd_kcontrol_chip(kc);
	unsigned int rate = 0;
	unsigned long flags;
	s64 frames = 0;

	spin_lock_irqsave(&s->lock, flags);
	if (s->substream) {
		frames = s->delay;
		rate = s->rate;
	}
	spin_unlock_irqrestore(&s->lock, flags);
	v->value.integer.value[0] = rate ? div_s64(frames * USEC_PER_SEC, rate) : 0;
	return 0;
}

static int vsnd_delay_ctl_add(struct snd_card *card, struct vsnd_stream *s)
{
	struct snd_kcontrol_new tmpl = {
		.iface = SNDRV_CTL_ELEM_IFACE_PCM,
		.name = s->capture ? "Capture Host Delay" : "Playback Host Delay",
		.device = s->pcm_index,
		.subdevice = s->subdevice,
		.access = SNDRV_CTL_ELEM_ACCESS_READ | SNDRV_CTL_ELEM_ACCESS_VOLATILE,
		.info = vsnd_delay_info,
		.get = vsnd_delay_get,
	};
	struct snd_kcontrol *kc = snd_ctl_new1(&tmpl, s);
	int ret;

	if (!kc)
		return -ENOMEM;
	ret = snd_ctl_add(card, kc);
	if (ret)
		return ret;
	s->delay_ctl = kc;
	return 0;
}

/* The usual ALSA card options, one per vsnd device (vsnd/<devid>). */
static int index[SNDRV_CARDS] = SNDRV_DEFAULT_IDX;
static char *id[SNDRV_CARDS] = SNDRV_DEFAULT_STR;
module_param_array(index, int, NULL, 0444);
MODULE_PARM_DESC(index, "Index value for each Xen vsnd card (by device id).");
module_param_array(id, charp, NULL, 0444);
MODULE_PARM_DESC(id, "ID string for each Xen vsnd card (by device id).");

int vsnd_card_create(struct vsnd_card *vc)
{
	bool chosen = vc->devid < SNDRV_CARDS;
	struct snd_card *card;
	unsigned int p;
	int ret;

	ret = snd_card_new(&vc->xb->dev, chosen ? index[vc->devid] : SNDRV_DEFAULT_IDX1,
			   chosen ? id[vc->devid] : NULL, THIS_MODULE, 0, &card);
	if (ret)
		return ret;
	strscpy(card->driver, "XenVsnd", sizeof(card->driver));
	strscpy(card->shortname, vc->short_name, sizeof(card->shortname));
	strscpy(card->longname, vc->long_name, sizeof(card->longname));
	for (p = 0; p < vc->npcms; p++) {
		struct vsnd_pcm_cfg *pc = &vc->pcms[p];
		struct snd_pcm *pcm;

		ret = snd_pcm_new(card, pc->name, p, pc->nplayback, pc->ncapture, &pcm);
		if (ret)
			goto fail;
		pcm->private_data = vc;
		strscpy(pcm->name, pc->name, sizeof(pcm->name));
		if (pc->nplayback)
			snd_pcm_set_ops(pcm, SNDRV_PCM_STREAM_PLAYBACK, &vsnd_pcm_ops);
		if (pc->ncapture)
			snd_pcm_set_ops(pcm, SNDRV_PCM_STREAM_CAPTURE, &vsnd_pcm_ops);
	}
	for (p = 0; p < vc->nstreams; p++) {
		ret = vsnd_delay_ctl_add(card, &vc->streams[p]);
		if (ret)
			goto fail;
	}
	ret = snd_card_register(card);
	if (ret)
		goto fail;
	vc->card = card;
	return 0;
fail:
	for (p = 0; p < vc->nstreams; p++)
		vc->streams[p].delay_ctl = NULL;
	snd_card_free(card);
	return ret;
}

void vsnd_card_remove(struct vsnd_card *vc)
{
	unsigned int i;

	if (!vc->card)
		return;
	/* The backend is gone or going: nobody waits for its answers now. */
	for (i = 0; i < vc->nstreams; i++)
		vsnd_stream_kill(&vc->streams[i], -ENODEV);
	snd_card_disconnect(vc->card);
	/* Returns once every application has closed the card. */
	snd_card_free(vc->card);
	vc->card = NULL;
	for (i = 0; i < vc->nstreams; i++)
		vc->streams[i].delay_ctl = NULL;
}
