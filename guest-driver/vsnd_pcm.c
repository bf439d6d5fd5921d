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
	unsigned int i, nth = ss->number;

	for (i = 0; i < vc->nstreams; i++) {
		struct vsnd_stream *s = &vc->streams[i];

		if (s->pcm_index == ss->pcm->device && s->capture == capture && nth-- == 0)
			return s;
	}
	return NULL;
}

/* Called with s->lock held, from the event interrupt. */
void vsnd_handle_cur_pos(struct vsnd_stream *s, u64 pos_bytes, u32 delay, bool *elapsed)
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
	if (s->card->backend_reports_delay)
		s->delay = delay;
	if (!delta)
		return;
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

static int vsnd_pcm_open(struct snd_pcm_substream *ss)
{
	struct snd_pcm_runtime *rt = ss->runtime;
	struct vsnd_stream *s = vsnd_find_stream(ss);
	struct xensnd_req req = { .operation = XENSND_OP_HW_PARAM_QUERY };
	struct xensnd_query_hw_param got;
	unsigned int i, n = 0, rmin = UINT_MAX, rmax = 0, cmin, cmax;
	unsigned int max_frames;
	u64 formats;
	bool queried;
	int ret;

	if (!s || s->dead)
		return -ENODEV;
	ss->private_data = s;
	formats = s->hw.formats;
	cmin = s->hw.channels_min;
	cmax = s->hw.channels_max;
	for (i = 0; i < s->hw.nrates; i++) {
		rmin = min(rmin, s->hw.rates[i]);
		rmax = max(rmax, s->hw.rates[i]);
	}
	/* Frames the buffer holds with the smallest frame of the config. */
	max_frames = s->hw.buffer_bytes_max / cmin;

	/* Narrow that down to what the backend can do now. */
	req.op.hw_param.formats = vsnd_alsa_formats_to_xen(formats);
	req.op.hw_param.rates.min = rmin;
	req.op.hw_param.rates.max = rmax;
	req.op.hw_param.channels.min = cmin;
	req.op.hw_param.channels.max = cmax;
	req.op.hw_param.buffer.min = 0;
	req.op.hw_param.buffer.max = max_frames;
	req.op.hw_param.period.min = 0;
	req.op.hw_param.period.max = max_frames;
	ret = vsnd_request(s, &req, &got);
	queried = ret == 0;
	if (queried) {
		formats &= vsnd_xen_formats_to_alsa(got.formats);
		rmin = max(rmin, got.rates.min);
		rmax = min(rmax, got.rates.max);
		cmin = max(cmin, got.channels.min);
		cmax = min(cmax, got.channels.max);
	} else if (ret == -ENODEV) {
		return ret;
	}
	if (!formats || rmin > rmax || cmin > cmax)
		return -EINVAL;

	rt->hw = vsnd_hw_base;
	rt->hw.formats = formats;
	rt->hw.rate_min = rmin;
	rt->hw.rate_max = rmax;
	rt->hw.channels_min = cmin;
	rt->hw.channels_max = cmax;
	rt->hw.buffer_bytes_max = s->hw.buffer_bytes_max;
	rt->hw.period_bytes_max = s->hw.buffer_bytes_max / 2;

	for (i = 0; i < s->hw.nrates; i++)
		if (s->hw.rates[i] >= rmin && s->hw.rates[i] <= rmax)
			s->rate_list[n++] = s->hw.rates[i];
	s->rate_constraint.count = n;
	s->rate_constraint.list = s->rate_list;
	s->rate_constraint.mask = 0;
	ret = snd_pcm_hw_constraint_list(rt, 0, SNDRV_PCM_HW_PARAM_RATE, &s->rate_constraint);
	if (ret < 0)
		return ret;
	if (queried && got.buffer.max && got.buffer.min <= got.buffer.max) {
		ret = snd_pcm_hw_constraint_minmax(rt, SNDRV_PCM_HW_PARAM_BUFFER_SIZE,
						   got.buffer.min, got.buffer.max);
		if (ret < 0)
			return ret;
	}
	if (queried && got.period.max && got.period.min <= got.period.max) {
		ret = snd_pcm_hw_constraint_minmax(rt, SNDRV_PCM_HW_PARAM_PERIOD_SIZE,
						   got.period.min, got.period.max);
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
	vsnd_request(s, &req, NULL);
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

	vsnd_backend_close(s);
	if (s->periods || s->total_frames)
		dev_info(&s->card->xb->dev,
			 "%s: %llu frames, %llu period interrupts of %lu frames, %llu early\n",
			 s->xs_path, s->total_frames, s->periods, s->period_frames,
			 s->early_periods);
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
	s->delay = 0;
	s->total_frames = 0;
	s->periods = 0;
	s->early_periods = 0;
	spin_unlock_irqrestore(&s->lock, flags);
	spin_lock_irqsave(&s->ring_lock, flags);
	s->last_appl = 0;
	s->appl_bytes = 0;
	s->told_bytes = 0;
	spin_unlock_irqrestore(&s->ring_lock, flags);

	req.op.open.pcm_rate = rt->rate;
	req.op.open.pcm_format = fmt;
	req.op.open.pcm_channels = rt->channels;
	req.op.open.buffer_sz = frames_to_bytes(rt, rt->buffer_size);
	req.op.open.gref_directory = s->dir_grefs[0];
	req.op.open.period_sz = frames_to_bytes(rt, rt->period_size);
	ret = vsnd_request(s, &req, NULL);
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
	spin_unlock_irqrestore(&s->lock, flags);
	return ptr;
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
	.pointer = vsnd_pcm_pointer,
	.ack = vsnd_pcm_ack,
};

int vsnd_card_create(struct vsnd_card *vc)
{
	struct snd_card *card;
	unsigned int p;
	int ret;

	ret = snd_card_new(&vc->xb->dev, SNDRV_DEFAULT_IDX1, NULL, THIS_MODULE, 0, &card);
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
	ret = snd_card_register(card);
	if (ret)
		goto fail;
	vc->card = card;
	return 0;
fail:
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
}
