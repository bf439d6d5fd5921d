// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * guest-latency: runs inside a Xen guest. Plays silence with an impulse
 * every few periods on hw:0,0 while recording hw:0,0 (dom0 routes the
 * guest's playback back into its capture). Before writing each impulse it
 * asks ALSA for both delays (snd_pcm_delay) and predicts where the impulse
 * must come back in the recording; then it finds the impulse and compares.
 *
 *   guest-latency [seconds]
 *
 * Both delays must describe the same host cycle. dom0 sends each stream's
 * position from that stream's own node, one after the other within a
 * graph cycle, and this program wakes right after a playback interrupt:
 * read between the two, one stream is a cycle behind the other, and the
 * prediction is a cycle off although each stream's delay is right. The
 * two hardware pointers move by the same frames every cycle, so their
 * difference stays the same between such moments: the value read most
 * often is the one of a consistent pair, and a read with another one is
 * taken again a moment later (each impulse says how many reads it took).
 *
 * Prints one line per impulse, then the spread of their errors (frames)
 *   guest-latency-impulses: count <n> min <a> median <b> max <c>
 * and then
 *   guest-latency: measured <frames> reported <frames> error <frames>
 * for the median impulse; exits 1 when fewer than 5 impulses came back,
 * or any impulse was not found or is off by more than 2 frames (then it
 * says how many: "guest-latency: <k> of <n> impulses off by more than 2
 * frames").
 */
#include <time.h>
#include <alsa/asoundlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RATE 48000
#define CHANNELS 2
#define PERIOD 9600		/* 200 ms: room for an emulated machine */
#define PERIODS 5
#define WARMUP_PERIODS 10	/* silence while dom0 links the nodes */
#define IMPULSE_EVERY 3		/* periods */
#define IMPULSE 30000
#define MAX_IMPULSES 64

struct mark {
	long predicted;		/* capture frame where the impulse must be */
	long base;		/* frames captured when it was predicted */
	long reported;		/* playback + capture delay then */
	long found;
	int reads;		/* reads until both delays were of one cycle */
	long first;		/* the prediction of the first read */
};

static void die(const char *what, int err)
{
	fprintf(stderr, "guest-latency: %s: %s\n", what, snd_strerror(err));
	exit(2);
}

/*
 * Reads both delays and the hardware pointers' difference (capture minus
 * playback; `written` and `captured` are the application pointers).
 */
static void read_delays(snd_pcm_t *play, snd_pcm_t *rec, long written, long captured,
		       long buffer, snd_pcm_sframes_t *dp, snd_pcm_sframes_t *dc, long *diff)
{
	snd_pcm_sframes_t ap, ac;
	int err;

	err = snd_pcm_avail_delay(play, &ap, dp);
	if (err < 0)
		die("playback delay", err);
	err = snd_pcm_avail_delay(rec, &ac, dc);
	if (err < 0)
		die("capture delay", err);
	*diff = (captured + ac) - (written - (buffer - ap));
}

static snd_pcm_t *open_pcm(snd_pcm_stream_t dir)
{
	snd_pcm_hw_params_t *hw;
	snd_pcm_sw_params_t *sw;
	snd_pcm_uframes_t period = PERIOD, buffer = PERIOD * PERIODS;
	snd_pcm_t *pcm;
	int err;

	err = snd_pcm_open(&pcm, "hw:0,0", dir, 0);
	if (err < 0)
		die("open", err);
	snd_pcm_hw_params_alloca(&hw);
	snd_pcm_hw_params_any(pcm, hw);
	if ((err = snd_pcm_hw_params_set_access(pcm, hw, SND_PCM_ACCESS_RW_INTERLEAVED)) < 0 ||
	    (err = snd_pcm_hw_params_set_format(pcm, hw, SND_PCM_FORMAT_S16_LE)) < 0 ||
	    (err = snd_pcm_hw_params_set_channels(pcm, hw, CHANNELS)) < 0 ||
	    (err = snd_pcm_hw_params_set_rate(pcm, hw, RATE, 0)) < 0 ||
	    (err = snd_pcm_hw_params_set_period_size_near(pcm, hw, &period, NULL)) < 0 ||
	    (err = snd_pcm_hw_params_set_buffer_size_near(pcm, hw, &buffer)) < 0 ||
	    (err = snd_pcm_hw_params(pcm, hw)) < 0)
		die("hw params", err);
	snd_pcm_sw_params_alloca(&sw);
	snd_pcm_sw_params_current(pcm, sw);
	/* Playback starts once the buffer is full; capture is started by hand. */
	snd_pcm_sw_params_set_start_threshold(pcm, sw, dir == SND_PCM_STREAM_PLAYBACK ? buffer : buffer * 2);
	if ((err = snd_pcm_sw_params(pcm, sw)) < 0)
		die("sw params", err);
	return pcm;
}

/*
 * The pointer differences of the last few periods: the one read most
 * often is the consistent one (while the nodes are being linked it moves;
 * no value twice: nothing is known yet).
 */
#define RECENT 9
static long recent[RECENT];
static int nrecent, next_recent;

static void note_diff(long d)
{
	recent[next_recent] = d;
	next_recent = (next_recent + 1) % RECENT;
	if (nrecent < RECENT)
		nrecent++;
}

static int times_seen(long d)
{
	int i, n = 0;

	for (i = 0; i < nrecent; i++)
		n += recent[i] == d;
	return n;
}

static int usual_diff(long d)
{
	int i, most = 0;

	for (i = 0; i < nrecent; i++)
		if (times_seen(recent[i]) > most)
			most = times_seen(recent[i]);
	return most < 2 || times_seen(d) == most;
}

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static int cmp_long(const void *a, const void *b)
{
	long x = *(const long *)a, y = *(const long *)b;

	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	double seconds = argc > 1 ? atof(argv[1]) : 10.0;
	long total_periods = (long)(seconds * RATE / PERIOD);
	long cap_len = (total_periods + PERIODS * 4) * PERIOD;
	short *cap = calloc((size_t)cap_len * CHANNELS, sizeof(short));
	short period_buf[PERIOD * CHANNELS];
	struct mark marks[MAX_IMPULSES];
	long errors[MAX_IMPULSES];
	snd_pcm_t *play, *rec;
	long captured = 0, written = 0, p, diff;
	long buffer = PERIOD * PERIODS;
	int nmarks = 0, nfound = 0, noff = 0, i, err;

	if (!cap)
		return 2;
	play = open_pcm(SND_PCM_STREAM_PLAYBACK);
	rec = open_pcm(SND_PCM_STREAM_CAPTURE);
	if ((err = snd_pcm_start(rec)) < 0)
		die("start capture", err);

	for (p = 0; p < total_periods; p++) {
		snd_pcm_sframes_t n;

		/* Take what was captured, so the capture delay is the ADC's. */
		while ((n = snd_pcm_avail(rec)) > 0 && captured + n <= cap_len) {
			n = snd_pcm_readi(rec, cap + captured * CHANNELS, n);
			if (n < 0)
				die("read", (int)n);
			captured += n;
		}
		memset(period_buf, 0, sizeof(period_buf));
		if (snd_pcm_state(play) == SND_PCM_STATE_RUNNING) {
			snd_pcm_sframes_t dp, dc;
			struct timespec moment = { 0, 2000000 };	/* 2 ms */
			int impulse = p >= WARMUP_PERIODS && p % IMPULSE_EVERY == 0 && nmarks < MAX_IMPULSES;
			int reads = 1;
			double until = now() + 0.05;
			long first;

			read_delays(play, rec, written, captured, buffer, &dp, &dc, &diff);
			first = captured + dp + dc;
			/* One stream a cycle ahead: again, for 50 ms at most (of a 1 s buffer). */
			while (impulse && !usual_diff(diff) && now() < until) {
				nanosleep(&moment, NULL);
				reads++;
				read_delays(play, rec, written, captured, buffer, &dp, &dc, &diff);
			}
			note_diff(diff);
			if (impulse) {
				marks[nmarks].base = captured;
				marks[nmarks].reported = dp + dc;
				marks[nmarks].predicted = captured + dp + dc;
				marks[nmarks].found = -1;
				marks[nmarks].reads = reads;
				marks[nmarks].first = first;
				nmarks++;
				period_buf[0] = period_buf[1] = IMPULSE;
			}
		}
		n = snd_pcm_writei(play, period_buf, PERIOD);
		if (n < 0)
			die("write", (int)n);
		written += n;
	}
	/* Let the last impulses come back. */
	for (p = 0; p < PERIODS * 3; p++) {
		snd_pcm_sframes_t n;

		memset(period_buf, 0, sizeof(period_buf));
		if (snd_pcm_writei(play, period_buf, PERIOD) < 0)
			break;
		while ((n = snd_pcm_avail(rec)) > 0 && captured + n <= cap_len) {
			n = snd_pcm_readi(rec, cap + captured * CHANNELS, n);
			if (n < 0)
				break;
			captured += n;
		}
	}
	snd_pcm_drop(play);
	snd_pcm_drop(rec);

	for (i = 0; i < nmarks; i++) {
		/*
		 * Impulses are IMPULSE_EVERY periods apart: look a period either
		 * side, and further late (an unmodified guest is not told what
		 * dom0 holds: its impulses come back late by that).
		 */
		long from = marks[i].predicted - PERIOD, to = marks[i].predicted + PERIOD * 3 / 2;
		long f;

		if (from < marks[i].base)
			from = marks[i].base;
		for (f = from; f < to && f < captured; f++)
			if (cap[f * CHANNELS] > IMPULSE / 2) {
				marks[i].found = f;
				break;
			}
		if (marks[i].found < 0) {
			printf("impulse %d: not found (predicted %ld)\n", i, marks[i].predicted);
			noff++;
			continue;
		}
		errors[nfound++] = marks[i].found - marks[i].predicted;
		if (labs(marks[i].found - marks[i].predicted) > 2)
			noff++;
		printf("impulse %d: measured %ld reported %ld error %ld (reads %d", i,
		       marks[i].found - marks[i].base, marks[i].reported,
		       marks[i].found - marks[i].predicted, marks[i].reads);
		if (marks[i].reads > 1)
			printf(", the first read's error %ld", marks[i].found - marks[i].first);
		printf(")\n");
	}
	if (nfound < 5) {
		printf("guest-latency: only %d of %d impulses came back\n", nfound, nmarks);
		return 1;
	}
	qsort(errors, nfound, sizeof(long), cmp_long);
	printf("guest-latency-impulses: count %d min %ld median %ld max %ld\n", nfound, errors[0],
	       errors[nfound / 2], errors[nfound - 1]);
	for (i = 0; i < nmarks; i++)
		if (marks[i].found >= 0 && marks[i].found - marks[i].predicted == errors[nfound / 2])
			break;
	printf("guest-latency: measured %ld reported %ld error %ld\n", marks[i].found - marks[i].base,
	       marks[i].reported, errors[nfound / 2]);
	if (noff)
		printf("guest-latency: %d of %d impulses off by more than 2 frames\n", noff, nmarks);
	return noff ? 1 : 0;
}
