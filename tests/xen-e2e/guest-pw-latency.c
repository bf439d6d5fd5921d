// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * guest-pw-latency: runs inside a Xen guest, as a client of the guest's
 * PipeWire. Plays silence with an impulse every IMPULSE_MS into a sink
 * while recording a source (dom0 routes the guest's playback back into its
 * capture). When it writes an impulse it takes the latencies its own
 * PipeWire reports for both streams (pw_stream_get_time_n: delay, plus
 * what the stream and its converter still hold) and predicts where the
 * impulse must come back in the recording; then it finds it and compares.
 * This is what an application's A/V sync or echo canceller relies on.
 * PipeWire reports latencies as JACK does: of the first frame of the
 * buffer a cycle hands over (played that long after the cycle's time, or
 * captured that long before it).
 *
 *   guest-pw-latency <sink node> <source node> [seconds [limit ms]]
 *
 * Prints one line per impulse, their spread, and then
 *   guest-pipewire-latency: measured <ms> reported <ms> error <ms>
 * for the median impulse (under emulation single impulses come up to a
 * few ms either side, so the run takes many); exits 1 when fewer than 20
 * impulses came back or the median |error| is above the limit (1 ms
 * unless given).
 */
#include <math.h>
#include <pipewire/pipewire.h>
#include <signal.h>
#include <spa/param/audio/format-utils.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RATE 48000
#define CHANNELS 2
#define WARMUP_MS 6000		/* silence while the guest's nodes settle */
#define IMPULSE_MS 300
#define IMPULSE 30000
#define MAX_IMPULSES 1024
#define FRAME_BYTES (CHANNELS * 2)

/* A stream's reported latency, frames at RATE: the delay to (or from)
 * the device, and what the stream and its converter hold. */
struct latency {
	long delay;
	long held;
};

struct mark {
	long predicted;		/* capture frame where the impulse must be */
	long base;		/* frames captured at the time it was written */
	long reported;		/* playback + capture latency then, frames */
	struct latency play, cap;
	long cap_size;		/* frames of the capture buffer then */
	long found;
};

static struct {
	struct pw_main_loop *loop;
	struct pw_stream *play, *rec;
	double seconds;
	double limit_ms;	/* the largest median |error| that passes */
	/* Touched only by the process callbacks (one data thread) until the
	 * streams are stopped. */
	long played, captured, next_impulse, cap_len;
	int64_t cap_now;	/* the capture cycle that last ran, ns */
	long cap_first;		/* the frame its buffer started with */
	long cap_size;		/* and the frames it held */
	struct latency cap_latency;	/* its reported latency */
	bool cap_seen;
	short *cap;
	struct mark marks[MAX_IMPULSES];
	int nmarks;
} g;

/* A stream's latency now, as PipeWire reports it; false if it cannot. */
static bool latency_now(struct pw_stream *s, int64_t *now, struct latency *l)
{
	struct pw_time t;

	if (pw_stream_get_time_n(s, &t, sizeof(t)) < 0 || !t.rate.denom)
		return false;
	*now = t.now;
	l->delay = (long)(t.delay * (int64_t)t.rate.num * RATE / t.rate.denom);
	l->held = (long)t.buffered + (long)(t.queued / FRAME_BYTES);
	return true;
}

static long total(const struct latency *l)
{
	return l->delay + l->held;
}

static void on_play(void *data __attribute__((unused)))
{
	struct pw_buffer *b = pw_stream_dequeue_buffer(g.play);
	struct spa_data *d;
	short *dst;
	uint32_t n;

	if (!b)
		return;
	d = &b->buffer->datas[0];
	dst = d->data;
	if (!dst)
		goto queue;
	n = d->maxsize / FRAME_BYTES;
	if (b->requested && b->requested < n)
		n = b->requested;
	memset(dst, 0, (size_t)n * FRAME_BYTES);
	if (g.cap_seen && g.played >= g.next_impulse && g.nmarks < MAX_IMPULSES) {
		struct mark *m = &g.marks[g.nmarks];
		int64_t now;

		if (latency_now(g.play, &now, &m->play)) {
			/* The frame the capture stream hands over first at this
			 * cycle's time. */
			m->base = g.cap_first + lround((double)(now - g.cap_now) * RATE / 1e9);
			m->cap_size = g.cap_size;
			m->cap = g.cap_latency;
			m->reported = total(&m->play) + total(&m->cap);
			m->predicted = m->base + m->reported;
			m->found = -1;
			g.nmarks++;
			dst[0] = dst[1] = IMPULSE;
		}
		g.next_impulse += (long)IMPULSE_MS * RATE / 1000;
	}
	g.played += n;
	d->chunk->offset = 0;
	d->chunk->stride = FRAME_BYTES;
	d->chunk->size = n * FRAME_BYTES;
queue:
	pw_stream_queue_buffer(g.play, b);
	if (g.played > (long)(g.seconds * RATE) + 2 * RATE)
		pw_main_loop_quit(g.loop);
}

static void on_rec(void *data __attribute__((unused)))
{
	struct pw_buffer *b = pw_stream_dequeue_buffer(g.rec);
	struct spa_data *d;
	long n, room;
	int64_t now;

	if (!b)
		return;
	d = &b->buffer->datas[0];
	if (d->data) {
		n = d->chunk->size / FRAME_BYTES;
		room = g.cap_len - g.captured;
		if (n > room)
			n = room;
		memcpy(g.cap + g.captured * CHANNELS, (char *)d->data + d->chunk->offset,
		       (size_t)n * FRAME_BYTES);
		g.cap_first = g.captured;
		g.cap_size = n;
		g.captured += n;
		g.cap_seen = latency_now(g.rec, &now, &g.cap_latency);
		g.cap_now = now;
	}
	pw_stream_queue_buffer(g.rec, b);
}

static const struct pw_stream_events play_events = {
	PW_VERSION_STREAM_EVENTS,
	.process = on_play,
};

static const struct pw_stream_events rec_events = {
	PW_VERSION_STREAM_EVENTS,
	.process = on_rec,
};

static struct pw_stream *stream(const char *name, const char *target, enum pw_direction dir,
				const struct pw_stream_events *events)
{
	uint8_t buf[1024];
	struct spa_pod_builder b = SPA_POD_BUILDER_INIT(buf, sizeof(buf));
	struct spa_audio_info_raw info = {
		.format = SPA_AUDIO_FORMAT_S16, .rate = RATE, .channels = CHANNELS,
		.position = { SPA_AUDIO_CHANNEL_FL, SPA_AUDIO_CHANNEL_FR },
	};
	const struct spa_pod *params[1];
	struct pw_properties *props;
	struct pw_stream *s;

	props = pw_properties_new(PW_KEY_MEDIA_TYPE, "Audio",
				  PW_KEY_MEDIA_CATEGORY, dir == PW_DIRECTION_OUTPUT ? "Playback" : "Capture",
				  PW_KEY_NODE_NAME, name, PW_KEY_TARGET_OBJECT, target,
				  PW_KEY_NODE_LATENCY, "1024/48000", NULL);
	/* For a check outside a guest: record a sink's monitor. */
	if (dir == PW_DIRECTION_INPUT && getenv("GUEST_PW_LATENCY_MONITOR"))
		pw_properties_set(props, PW_KEY_STREAM_CAPTURE_SINK, "true");
	s = pw_stream_new_simple(pw_main_loop_get_loop(g.loop), name, props, events, NULL);
	params[0] = spa_format_audio_raw_build(&b, SPA_PARAM_EnumFormat, &info);
	if (!s || pw_stream_connect(s, dir, PW_ID_ANY,
				    PW_STREAM_FLAG_AUTOCONNECT | PW_STREAM_FLAG_MAP_BUFFERS |
				    PW_STREAM_FLAG_RT_PROCESS, params, 1) < 0) {
		fprintf(stderr, "guest-pw-latency: cannot make the %s stream\n", name);
		exit(2);
	}
	return s;
}

static int cmp_long(const void *a, const void *b)
{
	long x = *(const long *)a, y = *(const long *)b;

	return (x > y) - (x < y);
}

static double ms(long frames)
{
	return frames * 1000.0 / RATE;
}

int main(int argc, char **argv)
{
	long errors[MAX_IMPULSES];
	int i, nfound = 0;
	double error_ms;

	if (argc < 3) {
		fprintf(stderr, "usage: guest-pw-latency <sink> <source> [seconds [limit ms]]\n");
		return 2;
	}
	g.seconds = argc > 3 ? atof(argv[3]) : 12.0;
	g.limit_ms = argc > 4 ? atof(argv[4]) : 1.0;
	g.cap_len = (long)((g.seconds + 10) * RATE);
	g.cap = calloc((size_t)g.cap_len * CHANNELS, sizeof(short));
	g.next_impulse = (long)WARMUP_MS * RATE / 1000;
	if (!g.cap)
		return 2;
	pw_init(&argc, &argv);
	g.loop = pw_main_loop_new(NULL);
	g.rec = stream("guest-pw-latency-rec", argv[2], PW_DIRECTION_INPUT, &rec_events);
	g.play = stream("guest-pw-latency-play", argv[1], PW_DIRECTION_OUTPUT, &play_events);
	pw_main_loop_run(g.loop);
	/* The data thread stops with the streams: the results are ours now. */
	pw_stream_destroy(g.play);
	pw_stream_destroy(g.rec);

	for (i = 0; i < g.nmarks; i++) {
		struct mark *m = &g.marks[i];
		/* Impulses are IMPULSE_MS apart: look a third of that either side. */
		long from = m->predicted - RATE / 10, to = m->predicted + RATE / 10, f;

		if (from < m->base)
			from = m->base;
		for (f = from; f < to && f < g.captured; f++)
			if (g.cap[f * CHANNELS] > IMPULSE / 2) {
				m->found = f;
				break;
			}
		if (m->found < 0) {
			printf("impulse %d: not found (predicted %ld, captured %ld)\n", i, m->predicted,
			       g.captured);
			continue;
		}
		errors[nfound++] = m->found - m->predicted;
		printf("impulse %d: measured %ld reported %ld (playback %ld+%ld, capture %ld+%ld, "
		       "capture buffer %ld) error %ld frames\n", i, m->found - m->base, m->reported,
		       m->play.delay, m->play.held, m->cap.delay, m->cap.held, m->cap_size,
		       m->found - m->predicted);
	}
	if (nfound < 20) {
		printf("guest-pipewire-latency: only %d of %d impulses came back\n", nfound, g.nmarks);
		return 1;
	}
	qsort(errors, nfound, sizeof(long), cmp_long);
	for (i = 0; i < g.nmarks; i++)
		if (g.marks[i].found >= 0 && g.marks[i].found - g.marks[i].predicted == errors[nfound / 2])
			break;
	printf("impulses: %d, error min %ld first quartile %ld median %ld third quartile %ld max %ld frames\n",
	       nfound, errors[0], errors[nfound / 4], errors[nfound / 2], errors[nfound - 1 - nfound / 4],
	       errors[nfound - 1]);
	error_ms = ms(errors[nfound / 2]);
	printf("guest-pipewire-latency: measured %.2f reported %.2f error %.2f\n",
	       ms(g.marks[i].found - g.marks[i].base), ms(g.marks[i].reported), error_ms);
	pw_deinit();
	return fabs(error_ms) <= g.limit_ms ? 0 : 1;
}
