// SPDX-License-Identifier: GPL-2.0-only
/*
 * snd-xen-vsnd: the card's configuration, as the toolstack wrote it in the
 * device's xenstore directory. Values given for the card apply to every pcm
 * and stream unless a pcm or a stream gives its own.
 */
#include <linux/kernel.h>
#include <linux/slab.h>
#include <linux/string.h>
#include "vsnd.h"

struct vsnd_format {
	const char *name;
	int xen;
	snd_pcm_format_t alsa;
};

static const struct vsnd_format vsnd_formats[] = {
	{ XENSND_PCM_FORMAT_S8_STR, XENSND_PCM_FORMAT_S8, SNDRV_PCM_FORMAT_S8 },
	{ XENSND_PCM_FORMAT_U8_STR, XENSND_PCM_FORMAT_U8, SNDRV_PCM_FORMAT_U8 },
	{ XENSND_PCM_FORMAT_S16_LE_STR, XENSND_PCM_FORMAT_S16_LE, SNDRV_PCM_FORMAT_S16_LE },
	{ XENSND_PCM_FORMAT_S16_BE_STR, XENSND_PCM_FORMAT_S16_BE, SNDRV_PCM_FORMAT_S16_BE },
	{ XENSND_PCM_FORMAT_U16_LE_STR, XENSND_PCM_FORMAT_U16_LE, SNDRV_PCM_FORMAT_U16_LE },
	{ XENSND_PCM_FORMAT_U16_BE_STR, XENSND_PCM_FORMAT_U16_BE, SNDRV_PCM_FORMAT_U16_BE },
	{ XENSND_PCM_FORMAT_S24_LE_STR, XENSND_PCM_FORMAT_S24_LE, SNDRV_PCM_FORMAT_S24_LE },
	{ XENSND_PCM_FORMAT_S24_BE_STR, XENSND_PCM_FORMAT_S24_BE, SNDRV_PCM_FORMAT_S24_BE },
	{ XENSND_PCM_FORMAT_U24_LE_STR, XENSND_PCM_FORMAT_U24_LE, SNDRV_PCM_FORMAT_U24_LE },
	{ XENSND_PCM_FORMAT_U24_BE_STR, XENSND_PCM_FORMAT_U24_BE, SNDRV_PCM_FORMAT_U24_BE },
	{ XENSND_PCM_FORMAT_S32_LE_STR, XENSND_PCM_FORMAT_S32_LE, SNDRV_PCM_FORMAT_S32_LE },
	{ XENSND_PCM_FORMAT_S32_BE_STR, XENSND_PCM_FORMAT_S32_BE, SNDRV_PCM_FORMAT_S32_BE },
	{ XENSND_PCM_FORMAT_U32_LE_STR, XENSND_PCM_FORMAT_U32_LE, SNDRV_PCM_FORMAT_U32_LE },
	{ XENSND_PCM_FORMAT_U32_BE_STR, XENSND_PCM_FORMAT_U32_BE, SNDRV_PCM_FORMAT_U32_BE },
	{ XENSND_PCM_FORMAT_F32_LE_STR, XENSND_PCM_FORMAT_F32_LE, SNDRV_PCM_FORMAT_FLOAT_LE },
	{ XENSND_PCM_FORMAT_F32_BE_STR, XENSND_PCM_FORMAT_F32_BE, SNDRV_PCM_FORMAT_FLOAT_BE },
	{ XENSND_PCM_FORMAT_F64_LE_STR, XENSND_PCM_FORMAT_F64_LE, SNDRV_PCM_FORMAT_FLOAT64_LE },
	{ XENSND_PCM_FORMAT_F64_BE_STR, XENSND_PCM_FORMAT_F64_BE, SNDRV_PCM_FORMAT_FLOAT64_BE },
};

int vsnd_format_to_xen(snd_pcm_format_t fmt)
{
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(vsnd_formats); i++)
		if (vsnd_formats[i].alsa == fmt)
			return vsnd_formats[i].xen;
	return -EINVAL;
}

u64 vsnd_xen_formats_to_alsa(u64 xen_mask)
{
	u64 out = 0;
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(vsnd_formats); i++)
		if (xen_mask & BIT_ULL(vsnd_formats[i].xen))
			out |= pcm_format_to_bits(vsnd_formats[i].alsa);
	return out;
}

u64 vsnd_alsa_formats_to_xen(u64 alsa_mask)
{
	u64 out = 0;
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(vsnd_formats); i++)
		if (alsa_mask & pcm_format_to_bits(vsnd_formats[i].alsa))
			out |= BIT_ULL(vsnd_formats[i].xen);
	return out;
}

/* Reads one key of dir/node as a string; NULL when absent. */
static char *vsnd_read_str(const char *dir, const char *node)
{
	char *v = xenbus_read(XBT_NIL, dir, node, NULL);

	return IS_ERR(v) ? NULL : v;
}

static void vsnd_parse_rates(struct vsnd_hw *hw, char *list)
{
	char *tok, *cur = list;
	unsigned int rate;

	hw->nrates = 0;
	while ((tok = strsep(&cur, XENSND_LIST_SEPARATOR)) && hw->nrates < VSND_MAX_RATES) {
		if (kstrtouint(strim(tok), 10, &rate) == 0 && rate >= 1000 && rate <= 768000)
			hw->rates[hw->nrates++] = rate;
	}
}

static void vsnd_parse_formats(struct vsnd_hw *hw, char *list)
{
	char *tok, *cur = list;
	unsigned int i;

	hw->formats = 0;
	while ((tok = strsep(&cur, XENSND_LIST_SEPARATOR))) {
		tok = strim(tok);
		for (i = 0; i < ARRAY_SIZE(vsnd_formats); i++)
			if (!strcmp(tok, vsnd_formats[i].name))
				hw->formats |= pcm_format_to_bits(vsnd_formats[i].alsa);
	}
}

/* Overrides in `hw` whatever directory `dir` gives itself. */
static void vsnd_read_hw(const char *dir, struct vsnd_hw *hw)
{
	char *v;

	v = vsnd_read_str(dir, XENSND_FIELD_SAMPLE_RATES);
	if (v) {
		vsnd_parse_rates(hw, v);
		kfree(v);
	}
	v = vsnd_read_str(dir, XENSND_FIELD_SAMPLE_FORMATS);
	if (v) {
		vsnd_parse_formats(hw, v);
		kfree(v);
	}
	hw->channels_min = xenbus_read_unsigned(dir, XENSND_FIELD_CHANNELS_MIN, hw->channels_min);
	hw->channels_max = xenbus_read_unsigned(dir, XENSND_FIELD_CHANNELS_MAX, hw->channels_max);
	hw->buffer_bytes_max = xenbus_read_unsigned(dir, XENSND_FIELD_BUFFER_SIZE,
						    hw->buffer_bytes_max);
}

static bool vsnd_hw_usable(const struct vsnd_hw *hw)
{
	return hw->formats && hw->nrates && hw->channels_min >= 1 &&
	       hw->channels_min <= hw->channels_max && hw->channels_max <= 64 &&
	       hw->buffer_bytes_max >= PAGE_SIZE && hw->buffer_bytes_max <= SZ_4M;
}

/* Counts the consecutive numbered subdirectories 0, 1, ... of dir. */
static unsigned int vsnd_count_dirs(const char *dir)
{
	unsigned int n = 0;
	char *sub;

	for (;;) {
		sub = kasprintf(GFP_KERNEL, "%s/%u", dir, n);
		if (!sub || !xenbus_exists(XBT_NIL, sub, "")) {
			kfree(sub);
			return n;
		}
		kfree(sub);
		n++;
	}
}

int vsnd_read_config(struct vsnd_card *vc)
{
	const char *root = vc->xb->nodename;
	struct vsnd_hw card_hw = {
		.channels_min = 1, .channels_max = 2, .buffer_bytes_max = SZ_64K,
	};
	unsigned int p, s, n = 0, total = 0;
	char *v;

	v = vsnd_read_str(root, XENSND_FIELD_VCARD_SHORT_NAME);
	strscpy(vc->short_name, v ?: "XenVsnd", sizeof(vc->short_name));
	kfree(v);
	v = vsnd_read_str(root, XENSND_FIELD_VCARD_LONG_NAME);
	strscpy(vc->long_name, v ?: "Xen PV sound", sizeof(vc->long_name));
	kfree(v);
	vsnd_read_hw(root, &card_hw);

	vc->npcms = vsnd_count_dirs(root);
	if (!vc->npcms || vc->npcms > 8)
		return -EINVAL;
	vc->pcms = kcalloc(vc->npcms, sizeof(*vc->pcms), GFP_KERNEL);
	if (!vc->pcms)
		return -ENOMEM;
	for (p = 0; p < vc->npcms; p++) {
		char *pdir = kasprintf(GFP_KERNEL, "%s/%u", root, p);

		if (!pdir)
			return -ENOMEM;
		total += vsnd_count_dirs(pdir);
		kfree(pdir);
	}
	if (!total || total > 64)
		return -EINVAL;
	vc->streams = kcalloc(total, sizeof(*vc->streams), GFP_KERNEL);
	if (!vc->streams)
		return -ENOMEM;

	for (p = 0; p < vc->npcms; p++) {
		struct vsnd_pcm_cfg *pc = &vc->pcms[p];
		struct vsnd_hw pcm_hw = card_hw;
		char *pdir = kasprintf(GFP_KERNEL, "%s/%u", root, p);
		unsigned int nstreams;

		if (!pdir)
			return -ENOMEM;
		v = vsnd_read_str(pdir, XENSND_FIELD_DEVICE_NAME);
		snprintf(pc->name, sizeof(pc->name), "%s", v ?: "vsnd");
		kfree(v);
		vsnd_read_hw(pdir, &pcm_hw);
		nstreams = vsnd_count_dirs(pdir);
		for (s = 0; s < nstreams && n < total; s++) {
			struct vsnd_stream *st = &vc->streams[n];

			snprintf(st->xs_path, sizeof(st->xs_path), "%s/%u", pdir, s);
			st->card = vc;
			st->pcm_index = p;
			st->hw = pcm_hw;
			vsnd_read_hw(st->xs_path, &st->hw);
			v = vsnd_read_str(st->xs_path, XENSND_FIELD_TYPE);
			st->capture = v && !strcmp(v, XENSND_STREAM_TYPE_CAPTURE);
			if (!v || (!st->capture && strcmp(v, XENSND_STREAM_TYPE_PLAYBACK))) {
				kfree(v);
				kfree(pdir);
				return -EINVAL;
			}
			kfree(v);
			if (!vsnd_hw_usable(&st->hw)) {
				kfree(pdir);
				return -EINVAL;
			}
			st->subdevice = st->capture ? pc->ncapture++ : pc->nplayback++;
			n++;
		}
		kfree(pdir);
	}
	vc->nstreams = n;
	return 0;
}

void vsnd_free_config(struct vsnd_card *vc)
{
	kfree(vc->streams);
	vc->streams = NULL;
	vc->nstreams = 0;
	kfree(vc->pcms);
	vc->pcms = NULL;
	vc->npcms = 0;
}
